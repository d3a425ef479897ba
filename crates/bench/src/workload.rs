//! The workloads, each driven against the one TCP address a path exposes. They only measure;
//! the runner decides how long, how often and what to keep.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

use crate::backend::{CHUNK, ECHO, LAST, MORE, SINK, SOURCE};

/// Latencies are recorded in nanoseconds, from 1 ns up to 60 s with 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static histogram bounds are valid")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Direction {
    /// Client → backend (the sink).
    Up,
    /// Backend (the source) → client.
    Down,
}

/// Bytes moved and the wall time they took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Transfer {
    pub bytes: u64,
    pub secs: f64,
}

impl Transfer {
    pub fn gbps(&self) -> f64 {
        if self.secs <= 0.0 {
            return 0.0;
        }
        self.bytes as f64 * 8.0 / self.secs / 1e9
    }
}

/// What a workload connects to: a path's TCP address, and for the `tls-client` path the TLS
/// the harness itself speaks there (to the edge, as forward's direct mode does).
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub tls: Option<Tls>,
}

/// A TLS client in the harness, with forward's own client config (the same cipher order,
/// verification and session cache as direct mode), shared so sessions resume.
#[derive(Clone)]
pub struct Tls {
    pub connector: TlsConnector,
    pub name: ServerName<'static>,
}

impl Tls {
    /// Trusts `ca` (PEM) besides the OS store and names the server `name`.
    pub fn new(ca: &std::path::Path, name: &str) -> anyhow::Result<Tls> {
        let config = forward_tunnel::tls::client_config(Some(ca), &[])?;
        Ok(Tls {
            connector: TlsConnector::from(config),
            name: ServerName::try_from(name.to_string())?,
        })
    }
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Target {
        Target { addr, tls: None }
    }
}

/// A connection a workload drives: plain TCP, or TLS over it.
pub type Conn = Either<TcpStream, TlsStream<TcpStream>>;

pub async fn connect(target: &Target) -> anyhow::Result<Conn> {
    let addr = target.addr;
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(match &target.tls {
        None => Either::Left(stream),
        Some(tls) => Either::Right(
            tls.connector
                .connect(tls.name.clone(), stream)
                .await
                .with_context(|| format!("TLS handshake with {addr}"))?,
        ),
    })
}

/// Writes `bytes` and pushes them out before the caller waits for an answer. A TLS stream
/// buffers like a `BufWriter`: when the socket is full, a write can return with bytes still in
/// rustls, and only a flush sends them (without it, one tls-client upload ×16 of session 23's
/// full run waited for the sink's count forever).
async fn send(stream: &mut Conn, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// `streams` parallel bulk transfers for `dur`; returns the summed bytes over the wall time
/// from the first stream's start to the last one's end (connection setup excluded).
///
/// Not over the longest stream's own time: a path that starves some streams of their first
/// byte runs them one after another, and each still reports `dur` of its own, so that figure
/// read up to ×3 the real rate (QUIC, one run of session 8: 31 Gbit/s).
pub async fn bulk(
    target: &Target,
    dir: Direction,
    streams: usize,
    dur: Duration,
) -> anyhow::Result<Transfer> {
    let mut tasks = Vec::with_capacity(streams);
    for _ in 0..streams {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let t = match dir {
                Direction::Up => upload(&target, dur).await,
                Direction::Down => download(&target, dur).await,
            }?;
            let end = Instant::now();
            let start = end - Duration::from_secs_f64(t.secs);
            Ok::<_, anyhow::Error>((t.bytes, start, end))
        }));
    }
    let mut bytes = 0;
    let mut span: Option<(Instant, Instant)> = None;
    for task in tasks {
        let (b, start, end) = task.await.context("bulk stream task")??;
        bytes += b;
        span = Some(match span {
            None => (start, end),
            Some((s, e)) => (s.min(start), e.max(end)),
        });
    }
    let secs = span.map_or(0.0, |(s, e)| e.duration_since(s).as_secs_f64());
    Ok(Transfer { bytes, secs })
}

/// Sends chunks for `dur`, then waits for the sink's count so only delivered bytes are counted.
async fn upload(target: &Target, dur: Duration) -> anyhow::Result<Transfer> {
    let mut stream = connect(target).await?;
    stream.write_all(&[SINK]).await?;
    let mut chunk = vec![0xa5u8; CHUNK];
    chunk[0] = MORE;
    let start = Instant::now();
    let end = start + dur;
    while Instant::now() < end {
        stream.write_all(&chunk).await?;
    }
    chunk[0] = LAST;
    send(&mut stream, &chunk).await?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .await
        .context("upload: no byte count from the sink")?;
    Ok(Transfer {
        bytes: u64::from_be_bytes(count),
        secs: start.elapsed().as_secs_f64(),
    })
}

async fn download(target: &Target, dur: Duration) -> anyhow::Result<Transfer> {
    Ok(download_settled(target, dur, dur).await?.0)
}

/// One download for `dur`, and separately the part after `settle`: the rate once the
/// sender's ramp-up (slow start, BBR's startup and its queue overshoot) is over.
pub async fn download_settled(
    target: &Target,
    dur: Duration,
    settle: Duration,
) -> anyhow::Result<(Transfer, Transfer)> {
    let mut stream = connect(target).await?;
    send(&mut stream, &[SOURCE]).await?;
    let mut buf = vec![0u8; 256 * 1024];
    // The clock starts at the first byte, so the request's trip over an emulated WAN does not
    // count against the path's throughput.
    let first = stream.read(&mut buf).await.context("download")?;
    if first == 0 {
        bail!("download: the path closed the stream before any data");
    }
    let mut total = first as u64;
    let start = Instant::now();
    let end = start + dur;
    let mark = start + settle.min(dur);
    let mut at_mark: Option<(Instant, u64)> = None;
    loop {
        let now = Instant::now();
        if at_mark.is_none() && now >= mark {
            at_mark = Some((now, total));
        }
        let left = end.saturating_duration_since(now);
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) => bail!("download: the path closed the stream early"),
            Ok(Ok(n)) => total += n as u64,
            Ok(Err(e)) => return Err(e).context("download"),
            Err(_) => break,
        }
    }
    let done = Instant::now();
    let (t_mark, bytes_mark) = at_mark.unwrap_or((done, total));
    Ok((
        Transfer {
            bytes: total,
            secs: done.duration_since(start).as_secs_f64(),
        },
        Transfer {
            bytes: total - bytes_mark,
            secs: done.duration_since(t_mark).as_secs_f64(),
        },
    ))
}

/// 1-byte ping-pong on one connection for `dur` (at least `min_samples` round trips).
pub async fn ping_pong(
    target: &Target,
    dur: Duration,
    min_samples: u64,
) -> anyhow::Result<Histogram<u64>> {
    let mut stream = connect(target).await?;
    stream.write_all(&[ECHO]).await?;
    let mut hist = new_histogram();
    let mut byte = [0u8; 1];
    // One unrecorded round trip first: tunnels that set up lazily (stunnel's TLS handshake
    // happens on the first byte) would otherwise put their setup into the RTT tail.
    send(&mut stream, b"w").await?;
    stream
        .read_exact(&mut byte)
        .await
        .context("ping-pong: no echo")?;
    let end = Instant::now() + dur;
    while Instant::now() < end || hist.len() < min_samples {
        let t = Instant::now();
        send(&mut stream, b"p").await?;
        stream
            .read_exact(&mut byte)
            .await
            .context("ping-pong: the echo never came back")?;
        hist.saturating_record(t.elapsed().as_nanos() as u64);
    }
    Ok(hist)
}

/// One connection: connect, send the mode byte and one payload byte, wait for the echo.
async fn connect_first_byte(target: &Target) -> anyhow::Result<(Conn, Duration)> {
    let t = Instant::now();
    let mut stream = connect(target).await?;
    send(&mut stream, &[ECHO, b'x']).await?;
    let mut byte = [0u8; 1];
    stream
        .read_exact(&mut byte)
        .await
        .context("no first byte back")?;
    Ok((stream, t.elapsed()))
}

/// Sequential connect + first byte latencies.
pub async fn connect_latency(target: &Target, count: u64) -> anyhow::Result<Histogram<u64>> {
    let mut hist = new_histogram();
    for _ in 0..count {
        let (_stream, took) = connect_first_byte(target).await?;
        hist.saturating_record(took.as_nanos() as u64);
    }
    Ok(hist)
}

/// Connections per second with `workers` concurrent connect + first byte loops for `dur`.
pub async fn connect_rate(target: &Target, workers: usize, dur: Duration) -> anyhow::Result<f64> {
    let start = Instant::now();
    let end = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                connect_first_byte(&target).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.context("connect worker")??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Interactive round trips while one bulk download runs on the same path.
pub async fn fairness(
    target: &Target,
    dur: Duration,
) -> anyhow::Result<(Histogram<u64>, Transfer)> {
    fairness_after(target, Duration::from_millis(100), dur).await
}

/// [`fairness`] with the time the bulk stream gets to reach steady state before the first
/// round trip (on an emulated WAN that is many round trips).
pub async fn fairness_after(
    target: &Target,
    warmup: Duration,
    dur: Duration,
) -> anyhow::Result<(Histogram<u64>, Transfer)> {
    let bulk = {
        let target = target.clone();
        let dur = warmup + dur + Duration::from_millis(200);
        tokio::spawn(async move { bulk(&target, Direction::Down, 1, dur).await })
    };
    tokio::time::sleep(warmup).await;
    let hist = ping_pong(target, dur, 10).await?;
    let transfer = bulk.await.context("fairness bulk task")??;
    Ok((hist, transfer))
}

/// Opens `n` echo connections (each proven end to end with one byte) and keeps them open.
/// Returns the streams opened so far when one fails, with the error as text.
pub async fn hold_idle(
    target: &Target,
    n: usize,
    deadline: Instant,
    progress: &dyn Fn(usize),
) -> (Vec<Conn>, Option<String>) {
    let mut held = Vec::with_capacity(n);
    // A handful at a time: fast, but without a SYN flood that would measure the backlog instead.
    const PARALLEL: usize = 32;
    while held.len() < n {
        if Instant::now() >= deadline {
            let msg = format!("stopped at the time limit after {} connections", held.len());
            return (held, Some(msg));
        }
        let batch = PARALLEL.min(n - held.len());
        let mut tasks = Vec::with_capacity(batch);
        for _ in 0..batch {
            let target = target.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(10), connect_first_byte(&target)).await
            }));
        }
        for task in tasks {
            match task.await {
                Ok(Ok(Ok((stream, _)))) => held.push(stream),
                Ok(Ok(Err(e))) => return (held, Some(format!("{e:#}"))),
                Ok(Err(_)) => return (held, Some("connection timed out after 10 s".into())),
                Err(e) => return (held, Some(e.to_string())),
            }
        }
        progress(held.len());
    }
    (held, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use std::sync::Arc;

    #[tokio::test]
    async fn workloads_run_against_the_backend() {
        let backend = Backend::start("[::1]:0".parse().unwrap()).await.unwrap();
        run_every_workload(&Target::from(backend.addr)).await;
    }

    async fn run_every_workload(target: &Target) {
        let d = Duration::from_millis(100);
        let up = bulk(target, Direction::Up, 2, d).await.unwrap();
        assert!(up.bytes >= 2 * CHUNK as u64);
        let down = bulk(target, Direction::Down, 1, d).await.unwrap();
        assert!(down.bytes > 0);
        let rtt = ping_pong(target, d, 5).await.unwrap();
        assert!(rtt.len() >= 5);
        let conn = connect_latency(target, 3).await.unwrap();
        assert_eq!(conn.len(), 3);
        let (held, err) = hold_idle(
            target,
            40,
            Instant::now() + Duration::from_secs(60),
            &|_| {},
        )
        .await;
        assert_eq!(err, None);
        assert_eq!(held.len(), 40);
    }

    /// The `tls-client` path: the workloads speak TLS themselves, here to a TLS terminator
    /// in front of the backend (as the edge is), with a CA made for the test.
    #[tokio::test]
    async fn workloads_speak_tls_when_the_target_asks() {
        let backend = Backend::start("[::1]:0".parse().unwrap()).await.unwrap();
        let dir = std::env::temp_dir().join(format!("bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["vm1.vm.vers.sh".into()]).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![ca.cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(ca.signing_key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let edge = listener.local_addr().unwrap();
        let upstream = backend.addr;
        let accepts = tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut tls = acceptor.accept(tcp).await.unwrap();
                    let mut plain = TcpStream::connect(upstream).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        let tls = Tls::new(&ca_file, "vm1.vm.vers.sh").unwrap();
        run_every_workload(&Target {
            addr: edge,
            tls: Some(tls),
        })
        .await;
        // A name the certificate does not hold fails the workload, so nothing passes as TLS
        // that is not.
        let wrong = Target {
            addr: edge,
            tls: Some(Tls::new(&ca_file, "vm2.vm.vers.sh").unwrap()),
        };
        let err = ping_pong(&wrong, Duration::from_millis(10), 1)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("TLS handshake"), "{err:#}");
        accepts.abort();
        let _ = std::fs::remove_dir_all(dir);
    }

    /// What `Backend::start_cubic` relies on: a socket accepted from a listener set to Cubic
    /// sends with Cubic from the start (on a BBR system, never paced by BBR).
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_congestion_control() {
        let socket = tokio::net::TcpSocket::new_v6().unwrap();
        socket2::SockRef::from(&socket)
            .set_tcp_congestion(b"cubic")
            .unwrap();
        socket.bind("[::1]:0".parse().unwrap()).unwrap();
        let listener = socket.listen(8).unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let cc = socket2::SockRef::from(&accepted).tcp_congestion().unwrap();
        let name: Vec<u8> = cc.into_iter().take_while(|&b| b != 0).collect();
        assert_eq!(String::from_utf8_lossy(&name), "cubic");
    }

    /// The competing flow of the netem sharing runs: a download sent with TCP Cubic, from a
    /// listener set to Cubic before it listens.
    #[tokio::test]
    async fn a_download_can_be_sent_with_cubic() {
        let backend = Backend::start_cubic("[::1]:0".parse().unwrap())
            .await
            .unwrap();
        let d = Duration::from_millis(200);
        let (all, settled) = download_settled(&Target::from(backend.addr), d, d / 2)
            .await
            .unwrap();
        assert!(
            all.bytes > settled.bytes && settled.bytes > 0,
            "{all:?} {settled:?}"
        );
    }
}
