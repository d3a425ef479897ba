//! Uploads to a VM service that stopped reading, for the tests of the TCP and QUIC carriers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

/// A VM service on `[::1]` that accepts connections and never reads them. A small receive
/// buffer and an Ethernet-sized segment (accepted sockets inherit both) keep the kernel from
/// absorbing megabytes per connection (loopback's 64 KiB segments grow a sender's buffer to
/// 4 MiB), so the stall reaches the agent at once.
pub async fn deaf_server() -> SocketAddr {
    let sock = tokio::net::TcpSocket::new_v6().unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    socket2::SockRef::from(&sock).set_tcp_mss(1400).unwrap();
    sock.bind("[::1]:0".parse().unwrap()).unwrap();
    let l = sock.listen(1024).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

/// Writes `total` bytes (or forever, when `None`) into `s` in 16 KiB pieces, counting what
/// was taken in `written`.
pub fn upload<S>(mut s: S, total: Option<u64>, written: Arc<AtomicU64>) -> JoinHandle<()>
where
    S: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let chunk = vec![0x42u8; 16 * 1024];
        let mut sent = 0u64;
        while total.is_none_or(|t| sent < t) {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
            sent += chunk.len() as u64;
            written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    })
}

/// Waits until `written` stood still for two seconds (every upload then stalled for longer
/// than a carrier's one-second threshold) and returns it; panics after 60 s.
pub async fn settled(written: &AtomicU64) -> u64 {
    let wait = async {
        let mut last = written.load(Ordering::Relaxed);
        let mut quiet = 0;
        while quiet < 8 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = written.load(Ordering::Relaxed);
            quiet = if now == last { quiet + 1 } else { 0 };
            last = now;
        }
        last
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .expect("the uploads kept moving for 60 s")
}
