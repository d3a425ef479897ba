//! The "VM services" every path ends at: one TCP listener on `[::1]` whose mode is chosen by
//! the first byte a client sends, so each path only has to expose a single address.
//!
//! - `S` sink: the client sends fixed-size [`CHUNK`]s whose first byte is [`MORE`] or [`LAST`];
//!   after the last one the sink answers the byte count as a big-endian u64. Framing the end in
//!   band keeps the upload measurement independent of whether a path passes half-close through.
//! - `D` source: writes as fast as the path accepts until the client goes away.
//! - `E` echo: copies every byte back (1-byte ping-pong, connect + first byte, idle holds).
//!
//! [`Backend::start_cubic`] serves the same on a listener whose sockets send with TCP Cubic
//! whatever the system's default: a competing flow with the congestion control most laptops
//! and servers run (this kernel defaults to BBR). The listener is set before it listens, so
//! accepted sockets start with Cubic and BBR never turns on its internal pacing for them (a
//! socket switched after accept, as in session 15, keeps it: a paced Cubic).

use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const SINK: u8 = b'S';
pub const SOURCE: u8 = b'D';
pub const ECHO: u8 = b'E';
/// Upload chunk size; each chunk's first byte says whether more follow.
pub const CHUNK: usize = 128 * 1024;
pub const MORE: u8 = 0;
pub const LAST: u8 = 1;

/// A running backend; dropping it stops accepting (open connections finish on their own).
pub struct Backend {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Listens on `addr` (port 0 picks a free one).
    pub async fn start(addr: SocketAddr) -> anyhow::Result<Backend> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("backend: cannot listen on {addr}"))?;
        Ok(Backend::serve_on(listener))
    }

    /// [`Backend::start`] on a listener set to TCP Cubic before it listens (see the module).
    pub async fn start_cubic(addr: SocketAddr) -> anyhow::Result<Backend> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket2::SockRef::from(&socket)
            .set_tcp_congestion(b"cubic")
            .context("backend: cannot set TCP Cubic (is it in net.ipv4.tcp_available_congestion_control?)")?;
        socket
            .bind(addr)
            .with_context(|| format!("backend: cannot listen on {addr}"))?;
        Ok(Backend::serve_on(socket.listen(1024)?))
    }

    fn serve_on(listener: TcpListener) -> Backend {
        let addr = listener
            .local_addr()
            .expect("a listening socket has an address");
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(serve(stream));
                    }
                    // Running out of descriptors during the scale test must not end the backend.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                }
            }
        });
        Backend { addr, task }
    }
}

async fn serve(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut mode = [0u8; 1];
    if stream.read_exact(&mut mode).await.is_err() {
        return;
    }
    // Errors here are the client hanging up, which is how download and echo sessions end.
    let _ = match mode[0] {
        SINK => sink(&mut stream).await,
        SOURCE => source(&mut stream).await,
        ECHO => echo(&mut stream).await,
        _ => Ok(()),
    };
}

async fn sink(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut total: u64 = 0;
    loop {
        stream.read_exact(&mut buf).await?;
        total += CHUNK as u64;
        if buf[0] == LAST {
            break;
        }
    }
    stream.write_all(&total.to_be_bytes()).await?;
    stream.flush().await
}

async fn source(stream: &mut TcpStream) -> std::io::Result<()> {
    let buf = vec![0x5au8; 256 * 1024];
    loop {
        stream.write_all(&buf).await?;
    }
}

async fn echo(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}
