//! The test's own ends of each connection: the "VM service" backends on [::1] and the local client
//! that connects to forward's listener, plus seeded random payloads and their SHA-256.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rand::{rngs::StdRng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use crate::harness::TIMEOUT;

pub type Hash = [u8; 32];

pub const CHUNK: usize = 64 * 1024;

pub fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic random bytes: the same seed gives the same payload on both ends without keeping
/// 64 MiB in memory.
pub struct Payload {
    rng: StdRng,
    left: usize,
}

impl Payload {
    pub fn new(seed: u64, len: usize) -> Payload {
        Payload {
            rng: StdRng::seed_from_u64(seed),
            left: len,
        }
    }

    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    pub fn hash(seed: u64, len: usize) -> Hash {
        let mut p = Payload::new(seed, len);
        let mut h = Sha256::new();
        let mut buf = vec![0; CHUNK];
        while let Some(chunk) = p.next_chunk(&mut buf) {
            h.update(chunk);
        }
        h.finalize().into()
    }

    fn next_chunk<'a>(&mut self, buf: &'a mut [u8]) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        let n = self.left.min(buf.len());
        self.rng.fill_bytes(&mut buf[..n]);
        self.left -= n;
        Some(&buf[..n])
    }

    /// Writes the whole payload and returns its hash.
    pub fn send(mut self, w: &mut impl Write) -> io::Result<Hash> {
        let mut h = Sha256::new();
        let mut buf = vec![0; CHUNK];
        while let Some(chunk) = self.next_chunk(&mut buf) {
            w.write_all(chunk)?;
            h.update(chunk);
        }
        w.flush()?;
        Ok(h.finalize().into())
    }
}

/// Reads to EOF; returns the byte count and hash, or the error that ended the read (with what had
/// arrived before it).
pub fn drain(r: &mut impl Read) -> Result<(usize, Hash), (io::Error, usize)> {
    let mut h = Sha256::new();
    let mut buf = vec![0; CHUNK];
    let mut total = 0;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok((total, h.finalize().into())),
            Ok(n) => {
                h.update(&buf[..n]);
                total += n;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err((e, total)),
        }
    }
}

/// A local address printed by forward: TCP or a Unix socket path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Local {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Local {
    /// Parses the address part of `forwarding ADDR -> HOST:PORT (mode)`.
    pub fn parse(s: &str) -> Option<Local> {
        if s.starts_with('/') {
            return Some(Local::Unix(PathBuf::from(s)));
        }
        s.parse().ok().map(Local::Tcp)
    }

    pub fn connect(&self) -> Conn {
        self.try_connect()
            .unwrap_or_else(|e| panic!("connect to forward's listener {self}: {e}"))
    }

    pub fn try_connect(&self) -> io::Result<Conn> {
        let conn = match self {
            Local::Tcp(a) => TcpStream::connect_timeout(a, TIMEOUT).map(Conn::Tcp),
            Local::Unix(p) => UnixStream::connect(p).map(Conn::Unix),
        }?;
        conn.set_timeouts();
        Ok(conn)
    }
}

impl std::fmt::Display for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Local::Tcp(a) => write!(f, "{a}"),
            Local::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// One client connection, TCP or Unix, with read/write timeouts so a hang becomes a failure.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn set_timeouts(&self) {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s.set_write_timeout(Some(TIMEOUT)).unwrap();
                s.set_nodelay(true).unwrap();
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s.set_write_timeout(Some(TIMEOUT)).unwrap();
            }
        }
    }

    pub fn try_clone(&self) -> Conn {
        match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone().unwrap()),
            Conn::Unix(s) => Conn::Unix(s.try_clone().unwrap()),
        }
    }

    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends `len` seeded bytes and reads the echo concurrently; asserts the echo is byte-identical
/// and ends with a clean EOF after our half-close. Returns the hash of what was sent.
pub fn echo_exchange(conn: Conn, seed: u64, len: usize) -> Hash {
    let mut writer = conn.try_clone();
    let up = thread::spawn(move || {
        let h = Payload::new(seed, len)
            .send(&mut writer)
            .unwrap_or_else(|e| panic!("upload failed: {e}"));
        writer.shutdown_write().expect("shutdown(Write)");
        h
    });
    let mut reader = conn;
    let down = drain(&mut reader);
    let sent = up.join().expect("upload thread");
    match down {
        Ok((n, h)) => {
            assert_eq!(n, len, "echo length differs from what was sent");
            assert_eq!(hex(&h), hex(&sent), "echo bytes differ from what was sent");
        }
        Err((e, n)) => panic!("echo download failed after {n} of {len} bytes: {e}"),
    }
    sent
}

/// A blocking listener with a deep accept queue. std's `TcpListener::bind` asks for a backlog of
/// 128: a tunnel dialing 1000 streams at once overflows that, and the kernel then resets some
/// handshakes, which would be blamed on the tunnel. tokio's `TcpSocket` lets us ask for more.
fn listen(addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().expect("backend address");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let sock = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()
    } else {
        tokio::net::TcpSocket::new_v4()
    }
    .unwrap();
    sock.bind(addr)
        .unwrap_or_else(|e| panic!("bind backend on {addr}: {e}"));
    let listener = sock.listen(4096).unwrap().into_std().unwrap();
    listener.set_nonblocking(false).unwrap();
    listener
}

/// A listener on 127.0.0.1 whose port on [::1] is held (`closed_port::hold`), so that no other
/// test's service is given that port there and answers a dial that tries `::1` first (the
/// edge's, the agent's) in its place.
fn listen_ipv4_only() -> (TcpListener, socket2::Socket) {
    for _ in 0..100 {
        let listener = listen("127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        if let Some(twin) = crate::closed_port::hold((std::net::Ipv6Addr::LOCALHOST, port).into()) {
            return (listener, twin);
        }
    }
    panic!("no port free on both 127.0.0.1 and [::1] in 100 tries");
}

/// What a backend saw on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub received: usize,
    pub hash: Hash,
    pub note: String,
}

/// Reads until the client's end, hashing; with `echo`, writes every byte back.
fn take_all(sock: &mut TcpStream, echo: bool) -> Report {
    let mut h = Sha256::new();
    let mut buf = vec![0; CHUNK];
    let mut total = 0;
    let note = loop {
        match sock.read(&mut buf) {
            Ok(0) => break "eof".to_string(),
            Ok(n) => {
                h.update(&buf[..n]);
                total += n;
                if echo {
                    if let Err(e) = sock.write_all(&buf[..n]) {
                        break format!("write error: {e}");
                    }
                }
            }
            Err(e) => break format!("read error: {e}"),
        }
    };
    Report {
        received: total,
        hash: h.finalize().into(),
        note,
    }
}

/// A "VM service" on [::1]:0: each accepted connection runs the handler on its own thread; the
/// handler reports what it saw through the returned channel.
pub struct Backend {
    pub port: u16,
    reports: Receiver<Report>,
    /// For an IPv4-only service: its port on [::1], bound and never listening, so no other
    /// test's service gets that port there and answers in its place (the edge and the agent
    /// dial `::1` first). Kept as long as the backend.
    _v6_twin: Option<socket2::Socket>,
}

type Handler = dyn Fn(TcpStream, &Sender<Report>) + Send + Sync;

impl Backend {
    pub fn start(handler: impl Fn(TcpStream, &Sender<Report>) + Send + Sync + 'static) -> Backend {
        Backend::start_on("[::1]:0", handler)
    }

    /// Like `start` on another loopback address (e.g. "127.0.0.1:0" for an IPv4-only service).
    pub fn start_on(
        addr: &str,
        handler: impl Fn(TcpStream, &Sender<Report>) + Send + Sync + 'static,
    ) -> Backend {
        let (listener, v6_twin) = if addr == "127.0.0.1:0" {
            let (listener, twin) = listen_ipv4_only();
            (listener, Some(twin))
        } else {
            (listen(addr), None)
        };
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        let tx = Arc::new(Mutex::new(tx));
        let handler: Arc<Handler> = Arc::new(handler);
        // The accept loop lives as long as the test process; the OS closes the socket at exit.
        thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { continue };
                sock.set_read_timeout(Some(TIMEOUT)).unwrap();
                sock.set_write_timeout(Some(TIMEOUT)).unwrap();
                sock.set_nodelay(true).unwrap();
                let tx = tx.lock().unwrap().clone();
                let handler = Arc::clone(&handler);
                thread::spawn(move || handler(sock, &tx));
            }
        });
        Backend {
            port,
            reports: rx,
            _v6_twin: v6_twin,
        }
    }

    /// Echoes every byte back; at the client's EOF it half-closes and reports what it received.
    pub fn echo() -> Backend {
        Backend::echo_on("[::1]:0")
    }

    pub fn echo_on(addr: &str) -> Backend {
        Backend::start_on(addr, |mut sock, tx| {
            let report = take_all(&mut sock, true);
            let _ = sock.shutdown(Shutdown::Write);
            let _ = tx.send(report);
        })
    }

    /// Reads to the end and reports, sending nothing; closes only `hold` after the client's
    /// end (like a server that answers a goodbye late).
    pub fn sink(hold: Duration) -> Backend {
        Backend::start(move |mut sock, tx| {
            let _ = tx.send(take_all(&mut sock, false));
            thread::sleep(hold);
        })
    }

    /// Ends its own direction at once (FIN before a byte), then reads to the end and reports:
    /// a client's upload then outlives every answer, as in a log shipper or `ssh host cat > f`.
    pub fn half_closing_sink() -> Backend {
        Backend::start(|mut sock, tx| {
            let _ = sock.shutdown(Shutdown::Write);
            let _ = tx.send(take_all(&mut sock, false));
        })
    }

    pub fn next_report(&self) -> Report {
        self.reports
            .recv_timeout(TIMEOUT)
            .expect("backend did not report within the timeout")
    }
}

/// Asserts that the agent at `addr` answers `GET /health` with 200, without authentication.
pub fn assert_health_ok(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(crate::harness::TIMEOUT)).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: vm1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "GET /health answered {answer:?}"
    );
}
