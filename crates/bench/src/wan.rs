//! WAN emulation in user space (this kernel has no netem): relays that sit between the client
//! side of a path and its server side and add one-way delay, a bandwidth cap and, for UDP,
//! loss and reordering.
//!
//! ```text
//!  client ──► relay listen (127.0.0.2:P) ──[queue: due time, token bucket]──► upstream (127.0.0.1:P)
//!         ◄──────────────────────────────[queue: due time, token bucket]◄──
//! ```
//!
//! Delay is a queue of timestamped chunks, so many chunks are in flight at once and throughput
//! is not one chunk per round trip. The queue is bounded in bytes (about two bandwidth-delay
//! products), which is what makes a sender's window matter: a window smaller than the BDP
//! cannot fill the emulated pipe. The TCP relay terminates TCP on both sides, so the kernel's
//! own window auto-tuning only ever sees loopback; what these profiles test is the tunnel's own
//! flow control (mux windows, TLS buffering) and request/response latency.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Profile {
    pub name: &'static str,
    /// Round-trip time added (half each way).
    pub rtt_ms: u64,
    /// Bandwidth cap per direction; `None` is unlimited.
    pub mbit: Option<u64>,
    /// UDP only: probability a datagram is dropped.
    pub loss: f64,
    /// UDP only: probability a datagram is held back an extra quarter of the one-way delay.
    pub reorder: f64,
}

pub const PROFILES: &[Profile] = &[
    Profile {
        name: "wan20",
        rtt_ms: 20,
        mbit: Some(1000),
        loss: 0.0,
        reorder: 0.0,
    },
    Profile {
        name: "wan50",
        rtt_ms: 50,
        mbit: Some(500),
        loss: 0.0,
        reorder: 0.0,
    },
    Profile {
        name: "wan100",
        rtt_ms: 100,
        mbit: Some(100),
        loss: 0.0,
        reorder: 0.0,
    },
    Profile {
        name: "wan100-1g",
        rtt_ms: 100,
        mbit: Some(1000),
        loss: 0.0,
        reorder: 0.0,
    },
    // Loss and reordering exist only in the UDP relay (the TCP relay's own connections are
    // lossless), so this profile runs the UDP paths only. A reordered datagram overtaken by more
    // than 3 others counts as lost for QUIC (RFC 9002 packet threshold), so both rates matter.
    Profile {
        name: "lossy50",
        rtt_ms: 50,
        mbit: Some(100),
        loss: 0.001,
        reorder: 0.001,
    },
];

pub fn profile(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

impl Profile {
    /// Whether the profile drops or reorders datagrams, which only the UDP relay emulates.
    pub fn is_lossy(&self) -> bool {
        self.loss > 0.0 || self.reorder > 0.0
    }

    fn one_way(&self) -> Duration {
        Duration::from_micros(self.rtt_ms * 500)
    }

    fn bytes_per_sec(&self) -> Option<f64> {
        self.mbit.map(|m| m as f64 * 1e6 / 8.0)
    }

    /// Bytes the relay may hold per direction: two bandwidth-delay products, at least 1 MiB.
    fn queue_bytes(&self) -> usize {
        let bdp = self
            .bytes_per_sec()
            .map(|r| r * self.rtt_ms as f64 / 1000.0)
            .unwrap_or(32.0 * 1024.0 * 1024.0);
        ((2.0 * bdp) as usize).max(1 << 20)
    }
}

/// A token bucket shared by every connection going one way through a relay: one link.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Tokio's timers fire late by up to a millisecond; a burst of a few milliseconds of
    /// traffic carries that oversleep over as credit instead of losing it, which would cap a
    /// 1 Gbit/s link at about half its rate.
    fn burst_for(rate: f64) -> f64 {
        (rate * 0.004).max(128.0 * 1024.0)
    }

    fn new(rate: f64) -> Bucket {
        let burst = Bucket::burst_for(rate);
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes `n` bytes of credit; returns how long the caller must wait before sending them.
    fn take(&mut self, n: usize) -> Duration {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

struct Link {
    one_way: Duration,
    bucket: Option<Mutex<Bucket>>,
    queue_bytes: usize,
}

impl Link {
    fn new(p: &Profile) -> Arc<Link> {
        Arc::new(Link {
            one_way: p.one_way(),
            bucket: p.bytes_per_sec().map(|r| Mutex::new(Bucket::new(r))),
            queue_bytes: p.queue_bytes(),
        })
    }

    fn wait_for(&self, n: usize) -> Duration {
        match &self.bucket {
            Some(b) => b.lock().map(|mut b| b.take(n)).unwrap_or(Duration::ZERO),
            None => Duration::ZERO,
        }
    }
}

/// A TCP relay; dropping it stops accepting and tears down its connections.
pub struct TcpRelay {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpRelay {
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        profile: &Profile,
    ) -> anyhow::Result<TcpRelay> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("WAN relay: cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let up_link = Link::new(profile);
        let down_link = Link::new(profile);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let (up, down) = (up_link.clone(), down_link.clone());
                conns.spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pipe(cr, sw, up), pipe(sr, cw, down));
                });
                // Reap finished connections so a long run does not accumulate handles.
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(TcpRelay { addr, task })
    }
}

/// One direction: read → (due time, bytes) queue → wait until due and for tokens → write.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, link: Arc<Link>) {
    let budget = Arc::new(Semaphore::new(link.queue_bytes));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = {
        let budget = budget.clone();
        let one_way = link.one_way;
        async move {
            loop {
                let mut buf = vec![0u8; 64 * 1024];
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                buf.truncate(n);
                let Ok(permit) = budget.acquire_many(n as u32).await else {
                    break;
                };
                permit.forget();
                if tx.send((Instant::now() + one_way, buf)).is_err() {
                    break;
                }
            }
            // Dropping `tx` lets the writer drain the queue and then pass the EOF on.
        }
    };
    let writer = async move {
        while let Some((due, buf)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let wait = link.wait_for(buf.len());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if to.write_all(&buf).await.is_err() {
                // Wakes the reader if it waits for queue space that will never be freed.
                budget.close();
                return;
            }
            budget.add_permits(buf.len());
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// A UDP relay for one client (a QUIC endpoint uses one socket): delay, a rate cap with a
/// bounded queue (tail drop beyond 50 ms of backlog), random loss and reordering.
pub struct UdpRelay {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// When a datagram leaves the emulated link; `None` means it is lost.
struct Shaper {
    profile: Profile,
    link_free: Instant,
}

impl Shaper {
    fn schedule(&mut self, len: usize, rng: &mut impl Rng) -> Option<Instant> {
        let now = Instant::now();
        if self.profile.loss > 0.0 && rng.gen_bool(self.profile.loss.min(1.0)) {
            return None;
        }
        let mut depart = now;
        if let Some(rate) = self.profile.bytes_per_sec() {
            depart = self.link_free.max(now) + Duration::from_secs_f64(len as f64 / rate);
            if depart.duration_since(now) > Duration::from_millis(50) {
                return None;
            }
            self.link_free = depart;
        }
        let mut due = depart + self.profile.one_way();
        if self.profile.reorder > 0.0 && rng.gen_bool(self.profile.reorder.min(1.0)) {
            due += self.profile.one_way() / 4 + Duration::from_millis(1);
        }
        Some(due)
    }
}

impl UdpRelay {
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        profile: &Profile,
    ) -> anyhow::Result<UdpRelay> {
        let front = Arc::new(
            udp_socket(listen).with_context(|| format!("UDP WAN relay: cannot bind {listen}"))?,
        );
        let addr = front.local_addr()?;
        let back_bind: SocketAddr = if upstream.is_ipv6() {
            "[::1]:0".parse()?
        } else {
            "127.0.0.1:0".parse()?
        };
        let back = Arc::new(udp_socket(back_bind)?);
        back.connect(upstream).await?;
        let mut up = Shaper {
            profile: profile.clone(),
            link_free: Instant::now(),
        };
        let mut down = Shaper {
            profile: profile.clone(),
            link_free: Instant::now(),
        };
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let lines = async {
                tokio::join!(
                    delay_line(up_rx, back.clone()),
                    delay_line(down_rx, front.clone())
                );
            };
            let pump = async {
                let mut rng = rand::rngs::StdRng::from_entropy();
                let mut fbuf = vec![0u8; 65536];
                let mut bbuf = vec![0u8; 65536];
                let mut client: Option<SocketAddr> = None;
                loop {
                    tokio::select! {
                        r = front.recv_from(&mut fbuf) => {
                            let Ok((n, from)) = r else { continue };
                            client = Some(from);
                            if let Some(due) = up.schedule(n, &mut rng) {
                                let _ = up_tx.send((due, fbuf[..n].to_vec(), None));
                            }
                        }
                        r = back.recv(&mut bbuf) => {
                            let Ok(n) = r else { continue };
                            let Some(to) = client else { continue };
                            if let Some(due) = down.schedule(n, &mut rng) {
                                let _ = down_tx.send((due, bbuf[..n].to_vec(), Some(to)));
                            }
                        }
                    }
                }
            };
            tokio::join!(lines, pump);
        });
        Ok(UdpRelay { addr, task })
    }
}

/// A UDP socket with large buffers: the relay must not be where datagrams are dropped (the
/// kernel caps the size at net.core.rmem_max / wmem_max).
fn udp_socket(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    let _ = sock.set_recv_buffer_size(16 << 20);
    let _ = sock.set_send_buffer_size(16 << 20);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(UdpSocket::from_std(sock.into())?)
}

/// A datagram waiting in the emulated link: when it is due, its bytes, where it goes
/// (`None`: the connected upstream).
type Datagram = (Instant, Vec<u8>, Option<SocketAddr>);

/// Sends datagrams when they are due, in due-time order. One task per direction rather than a
/// timer task per datagram: timers firing in the same millisecond wake in no particular order,
/// and that accidental reordering alone makes QUIC declare losses and collapse its window.
async fn delay_line(mut rx: mpsc::UnboundedReceiver<Datagram>, sock: Arc<UdpSocket>) {
    // Min-heap on (due, arrival order): equal due times keep their arrival order.
    type Queued = Reverse<(Instant, u64, Vec<u8>, Option<SocketAddr>)>;
    let mut heap: BinaryHeap<Queued> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        let next = heap.peek().map(|Reverse(d)| d.0);
        tokio::select! {
            biased;
            m = rx.recv() => match m {
                Some((due, data, to)) => {
                    seq += 1;
                    heap.push(Reverse((due, seq, data, to)));
                }
                None => return,
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                while heap.peek().is_some_and(|Reverse(d)| d.0 <= now) {
                    let Some(Reverse((_, _, data, to))) = heap.pop() else { break };
                    let _ = match to {
                        Some(a) => sock.send_to(&data, a).await,
                        None => sock.send(&data).await,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::workload;

    fn test_profile(rtt_ms: u64, mbit: Option<u64>, loss: f64) -> Profile {
        Profile {
            name: "test",
            rtt_ms,
            mbit,
            loss,
            reorder: 0.0,
        }
    }

    #[tokio::test]
    async fn tcp_relay_adds_the_configured_delay() {
        let backend = Backend::start("[::1]:0".parse().unwrap()).await.unwrap();
        let relay = TcpRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            backend.addr,
            &test_profile(40, None, 0.0),
        )
        .await
        .unwrap();
        let hist = workload::ping_pong(&relay.addr.into(), Duration::ZERO, 5)
            .await
            .unwrap();
        assert!(hist.min() >= 40_000_000, "min RTT {} ns", hist.min());
    }

    #[tokio::test]
    async fn tcp_relay_caps_the_rate() {
        let backend = Backend::start("[::1]:0".parse().unwrap()).await.unwrap();
        // 40 Mbit/s = 5 MB/s; everything beyond the burst must wait for tokens.
        let relay = TcpRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            backend.addr,
            &test_profile(2, Some(40), 0.0),
        )
        .await
        .unwrap();
        let t = workload::bulk(
            &relay.addr.into(),
            workload::Direction::Up,
            1,
            Duration::from_millis(300),
        )
        .await
        .unwrap();
        let floor = (t.bytes as f64 - Bucket::burst_for(5e6)) / 5e6;
        assert!(t.secs >= floor, "{} bytes in {} s", t.bytes, t.secs);
    }

    async fn udp_echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let _ = sock.send_to(&buf[..n], from).await;
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn udp_relay_adds_the_configured_delay() {
        let (echo, _task) = udp_echo().await;
        let relay = UdpRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            echo,
            &test_profile(30, Some(100), 0.0),
        )
        .await
        .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let t = Instant::now();
        client.send_to(b"ping", relay.addr).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert!(t.elapsed() >= Duration::from_millis(30));
    }

    #[tokio::test]
    async fn udp_relay_with_full_loss_delivers_nothing() {
        let (echo, _task) = udp_echo().await;
        let relay = UdpRelay::start(
            "127.0.0.1:0".parse().unwrap(),
            echo,
            &test_profile(0, None, 1.0),
        )
        .await
        .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for _ in 0..20 {
            client.send_to(b"x", relay.addr).await.unwrap();
        }
        let mut buf = [0u8; 16];
        let got =
            tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await;
        assert!(got.is_err(), "a datagram got through a link with 100% loss");
    }

    #[test]
    fn profiles_are_named_and_bounded() {
        assert!(profile("wan100").is_some());
        assert!(profile("nope").is_none());
        for p in PROFILES {
            assert!(p.queue_bytes() >= 1 << 20);
        }
    }
}
