//! Helpers for the agent tests: an agent on a loopback port, client links, backends (echo,
//! firehose), a TCP proxy that records and can freeze, one that holds what the agent sends, a
//! raw frame-level client, and a test CA.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forward_mux::frame::{self, FrameType, Header};
use forward_mux::{Decoder, ErrorCode, Frame, Target};
use forward_tunnel::agent::{Agent, AgentConfig};
use forward_tunnel::agent_client::{AgentConnector, AgentLink, CarrierTransport, LinkConfig};
use forward_tunnel::auth::{self, Token};
use forward_tunnel::upgrade::{self, Head};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// 256 bits of hex: the shared secret of every test.
pub const TOKEN_HEX: &str = "5f1c2e3d4a5b6c7d8e9fa0b1c2d3e4f5061728394a5b6c7d8e9fa0b1c2d3e4f5";
/// A different, equally strong secret.
pub const OTHER_TOKEN_HEX: &str =
    "9c41e07a2bd35f86c1e94a7d0b3f52e8a6d17c04f9b25e3a8c60d1f47b92e5a3";

/// Generous deadline for anything that should happen "soon" on a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn token() -> Token {
    Token::new(TOKEN_HEX, "test").expect("the test token is strong")
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// Deterministic pseudo-random bytes (xorshift), so no two streams carry the same payload.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Awaits `f` or panics naming `what`.
pub async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: nothing happened within {PATIENCE:?}"),
    }
}

// ----- agent ------------------------------------------------------------------------------------

pub struct TestAgent {
    pub addr: SocketAddr,
    pub stop: CancellationToken,
    pub done: JoinHandle<()>,
}

/// An agent on `listen`, with `tweak` applied to the default config, draining up to `drain`
/// when stopped.
pub fn start_agent_full(
    listen: SocketAddr,
    drain: Duration,
    tweak: impl FnOnce(&mut AgentConfig),
) -> TestAgent {
    let mut config = AgentConfig::new(listen, token());
    tweak(&mut config);
    let agent = Agent::bind(config).expect("binding the agent");
    let addr = agent.local_addr().unwrap();
    let stop = CancellationToken::new();
    let done = tokio::spawn(agent.run(stop.clone(), drain));
    TestAgent { addr, stop, done }
}

pub fn start_agent_on(listen: SocketAddr, tweak: impl FnOnce(&mut AgentConfig)) -> TestAgent {
    start_agent_full(listen, Duration::from_secs(60), tweak)
}

pub fn start_agent(tweak: impl FnOnce(&mut AgentConfig)) -> TestAgent {
    start_agent_on("127.0.0.1:0".parse().unwrap(), tweak)
}

/// A port that accepts TCP and never answers the upgrade (a hung agent, a path that dies
/// after the handshake); abort the task to let the connections go.
pub async fn mute_agent() -> (SocketAddr, JoinHandle<()>) {
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = mute.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = mute.accept().await {
            conns.push(s);
        }
    });
    (addr, held)
}

/// A link over plain TCP straight to `addr`.
pub fn link_config(addr: SocketAddr, token: Token) -> LinkConfig {
    LinkConfig {
        host: addr.ip().to_string(),
        port: addr.port(),
        edge: None,
        transport: CarrierTransport::Tcp,
        token,
        mux: forward_mux::Config::default(),
        timeout: Duration::from_secs(10),
    }
}

pub fn connector(link: &Arc<AgentLink>, host: &str, port: u16) -> AgentConnector {
    AgentConnector::new(link.clone(), Target::new(host, port).unwrap())
}

/// A fresh client still gets a correct round trip through `agent`.
pub async fn assert_still_serving(agent: SocketAddr) {
    let echo = echo_server("127.0.0.1:0").await;
    let link = AgentLink::new(link_config(agent, token()));
    echo_round_trip(&connector(&link, "", echo.port()), 77, 200_000)
        .await
        .expect("the agent keeps serving good clients");
}

// ----- backends ---------------------------------------------------------------------------------

/// Echoes every connection until its EOF, then half-closes back.
pub async fn echo_server(bind: &str) -> SocketAddr {
    counted_echo_server(bind).await.0
}

/// [`echo_server`] that also counts the connections it accepted.
pub async fn counted_echo_server(bind: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    (addr, accepted)
}

/// Sends `pattern(seed, total)` to every connection, never reading; counts bytes handed to the
/// kernel so a test can tell how much is pending toward a stalled reader.
pub async fn firehose_server(total: usize, seed: u64) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("[::1]:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let w2 = written.clone();
    tokio::spawn(async move {
        let data = Arc::new(pattern(seed, total));
        while let Ok((mut s, _)) = l.accept().await {
            let data = data.clone();
            let written = w2.clone();
            tokio::spawn(async move {
                for chunk in data.chunks(16 * 1024) {
                    if s.write_all(chunk).await.is_err() {
                        return;
                    }
                    written.fetch_add(chunk.len(), Ordering::Relaxed);
                }
                let _ = s.shutdown().await;
                // Keep the socket until the peer is done, so its close stays orderly.
                let mut sink = [0u8; 1024];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, written)
}

/// Writes `data`, half-closes, and reads until EOF, both at once.
pub async fn exchange<S>(s: S, data: Vec<u8>) -> std::io::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut got = Vec::new();
    let read = r.read_to_end(&mut got).await;
    let w = writer.await.expect("writer task")?;
    read?;
    drop((r, w));
    Ok(got)
}

/// One echo round trip of `len` bytes through `connector`, hashes compared.
pub async fn echo_round_trip(c: &AgentConnector, seed: u64, len: usize) -> Result<(), String> {
    use forward_tunnel::Connector;
    let s = c.connect().await.map_err(|e| format!("connect: {e}"))?;
    let data = pattern(seed, len);
    let want = sha256(&data);
    let got = exchange(s, data)
        .await
        .map_err(|e| format!("exchange: {e}"))?;
    if sha256(&got) != want {
        return Err(format!(
            "echo of {len} bytes came back as {} different bytes",
            got.len()
        ));
    }
    Ok(())
}

// ----- proxy ------------------------------------------------------------------------------------

/// A TCP proxy in front of the agent: records what clients send, and can freeze (stop
/// forwarding in both directions while keeping every socket open, like a dead middlebox).
pub struct Proxy {
    pub addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    pub upstream: Arc<Mutex<Vec<u8>>>,
    /// Address of every client accepted, in order.
    pub clients: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        Proxy::start_with(target, None).await
    }

    /// Closes each connection `after` it was accepted, authenticated or not: an agent that
    /// drops every carrier moments after accepting it.
    pub async fn start_cutting(target: SocketAddr, after: Duration) -> Proxy {
        Proxy::start_with(target, Some(after)).await
    }

    async fn start_with(target: SocketAddr, cut: Option<Duration>) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let upstream = Arc::new(Mutex::new(Vec::new()));
        let clients = Arc::new(Mutex::new(Vec::new()));
        let (f, up, seen) = (frozen.clone(), upstream.clone(), clients.clone());
        tokio::spawn(async move {
            while let Ok((client, peer)) = l.accept().await {
                seen.lock().unwrap().push(peer);
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let both = futures_util::future::join(
                    pump(cr, sw, f.clone(), Some(up.clone())),
                    pump(sr, cw, f.clone(), None),
                );
                tokio::spawn(async move {
                    match cut {
                        // Dropping both halves of both sockets closes them.
                        Some(after) => drop(tokio::time::timeout(after, both).await),
                        None => drop(both.await),
                    }
                });
            }
        });
        Proxy {
            addr,
            frozen,
            upstream,
            clients,
        }
    }

    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// New connections flow again; a direction that went silent while frozen stays silent.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }
}

async fn pump<R, W>(
    mut r: R,
    mut w: W,
    frozen: Arc<AtomicBool>,
    record: Option<Arc<Mutex<Vec<u8>>>>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = w.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Silent but open: hold both sockets until the test ends.
            let _keep = (r, w);
            std::future::pending::<()>().await;
            return;
        }
        if let Some(rec) = &record {
            rec.lock().unwrap().extend_from_slice(&buf[..n]);
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A TCP proxy whose agent-to-client direction can be held: what the agent sends (its GOAWAY,
/// its refusals, its close) waits in the gate until `release`, so the client acts as if it had
/// not heard it yet. New connections go to whichever agent `retarget` named last.
pub struct Gate {
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    held: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    pub async fn start(target: SocketAddr) -> Gate {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let (held, _) = tokio::sync::watch::channel(false);
        let (to, gate) = (target.clone(), held.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                let upstream = *to.lock().unwrap();
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, mut cw) = client.into_split();
                let (mut sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, Arc::new(AtomicBool::new(false)), None));
                let mut open = gate.subscribe();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = sr.read(&mut buf).await.unwrap_or(0);
                        if open.wait_for(|held| !*held).await.is_err() {
                            return;
                        }
                        if n == 0 {
                            let _ = cw.shutdown().await;
                            return;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Gate { addr, target, held }
    }

    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    pub fn release(&self) {
        self.held.send_replace(false);
    }

    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }
}

/// Whether this process still holds an open socket for the TCP connection `local` ↔ `peer`
/// (ports only; Linux). A closed socket may linger in the kernel (FIN_WAIT, TIME_WAIT) but is
/// orphaned then: its inode in /proc/net/tcp* is 0.
pub fn socket_held(local_port: u16, peer_port: u16) -> bool {
    let port = |field: &str| {
        field
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|file| {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                f.len() > 9
                    && port(f[1]) == Some(local_port)
                    && port(f[2]) == Some(peer_port)
                    && f[9] != "0"
            })
    })
}

/// Waits until the socket `local` ↔ `peer` is no longer held by this process.
pub async fn released(what: &str, local_port: u16, peer_port: u16) {
    within(what, async {
        while socket_held(local_port, peer_port) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

// ----- raw frame-level client -------------------------------------------------------------------

/// A hand-driven client: HTTP upgrade by hand, frames written with forward-mux's codec.
pub struct Raw {
    pub s: TcpStream,
    pub challenge: Vec<u8>,
    /// The agent's name for this carrier, from its `101`.
    pub id: String,
    dec: Decoder,
    pending: Vec<u8>,
    eof: bool,
}

/// What the agent did after we misbehaved.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// A GOAWAY with this code, then the end of the byte stream.
    GoAway(ErrorCode, String),
    /// The carrier just ended.
    Closed,
}

pub fn auth_frame(proof: &[u8]) -> Vec<u8> {
    let mut out = Header::new(FrameType::Auth, 0, 0, proof.len() as u32)
        .encode()
        .to_vec();
    out.extend_from_slice(proof);
    out
}

pub fn open_frame(id: u32, host: &str, port: u16) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode_open(&mut out, id, &Target::new(host, port).unwrap());
    out
}

pub fn data_frame(id: u32, payload: &[u8], fin: bool) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode_data_header(&mut out, id, fin, payload.len() as u32);
    out.extend_from_slice(payload);
    out
}

impl Raw {
    /// TCP connect and the upgrade; the challenge is taken from the 101.
    pub async fn upgrade(agent: SocketAddr) -> Raw {
        Raw::upgrade_replacing(agent, None).await
    }

    /// [`Raw::upgrade`], naming a carrier this client lost.
    pub async fn upgrade_replacing(agent: SocketAddr, replaces: Option<&str>) -> Raw {
        let mut s = TcpStream::connect(agent).await.unwrap();
        let request = upgrade::request_replacing(&agent.ip().to_string(), agent.port(), replaces);
        s.write_all(request.as_bytes()).await.unwrap();
        let (head, leftover) = within("101 from the agent", upgrade::read_head(&mut s))
            .await
            .unwrap();
        let h = Head::parse(&head).expect("an HTTP response");
        assert_eq!(h.second, "101", "{head}");
        let challenge = auth::from_hex(h.header(upgrade::CHALLENGE_HEADER).unwrap()).unwrap();
        let id = h.header(upgrade::CARRIER_HEADER).unwrap().to_owned();
        assert!(upgrade::is_carrier_id(&id), "{id}");
        Raw {
            s,
            challenge,
            id,
            dec: Decoder::new(),
            pending: leftover,
            eof: false,
        }
    }

    /// Upgrade plus a correct AUTH, answered by AUTH_OK.
    pub async fn authenticated(agent: SocketAddr) -> Raw {
        Raw::authenticated_replacing(agent, None).await
    }

    /// [`Raw::authenticated`], naming a carrier this client lost.
    pub async fn authenticated_replacing(agent: SocketAddr, replaces: Option<&str>) -> Raw {
        let mut raw = Raw::upgrade_replacing(agent, replaces).await;
        let proof = token().prove(&raw.challenge, &agent.ip().to_string(), agent.port());
        raw.send(&auth_frame(&proof)).await.unwrap();
        assert_eq!(raw.next_frame().await, Some(Frame::AuthOk));
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes).await
    }

    /// The next frame, or `None` at the end of the carrier (EOF or reset).
    pub async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            let mut input = self.pending.as_slice();
            let decoded = self.dec.decode(&mut input);
            let used = self.pending.len() - input.len();
            self.pending.drain(..used);
            match decoded {
                Ok(Some(f)) => return Some(f),
                Ok(None) => {}
                Err(e) => panic!("the agent sent a malformed frame: {e}"),
            }
            if self.eof {
                return None;
            }
            let mut buf = [0u8; 16 * 1024];
            match within("a frame from the agent", self.s.read(&mut buf)).await {
                Ok(0) | Err(_) => self.eof = true,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Reads until the carrier ends; reports the GOAWAY seen on the way, if any.
    pub async fn ending(&mut self) -> Ending {
        let mut seen = None;
        while let Some(f) = self.next_frame().await {
            if let Frame::GoAway { code, reason, .. } = f {
                seen.get_or_insert((code, reason));
            }
        }
        match seen {
            Some((code, reason)) => Ending::GoAway(code, reason),
            None => Ending::Closed,
        }
    }
}

/// Sends a raw HTTP request and returns the whole response (the agent closes after it).
pub async fn http(agent: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(agent).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let _ = within("an HTTP answer", s.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

// ----- TLS --------------------------------------------------------------------------------------

/// A CA made for one test, a server config for `localhost` signed by it, and a client config
/// trusting only that CA.
pub fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "forward agent test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();

    let provider = forward_tunnel::tls::provider();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_cert.der().clone(), ca_cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}
