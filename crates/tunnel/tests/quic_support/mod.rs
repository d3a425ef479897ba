//! Helpers shared by the QUIC integration tests (`quic.rs`, `quic_credit.rs`): the test token and
//! TLS name, loopback binds, an echo backend and hashed byte patterns.
#![allow(dead_code)] // each test binary uses its own subset

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const TOKEN: &str = "00112233445566778899aabbccddeeff0011223344556677";
/// TLS name the clients use; with a pin it is not checked, but it is bound into the proof.
pub const NAME: &str = "agent.test";

pub fn v6() -> SocketAddr {
    SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 0)
}

pub fn v4() -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)
}

/// Echo backend: every connection gets its bytes back, then FIN after the client's FIN.
pub async fn echo(bind: SocketAddr) -> u16 {
    let l = TcpListener::bind(bind).await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    port
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

pub fn sha(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

/// Sends `data` through `stream` and reads until EOF at the same time; returns what came back.
pub async fn round_trip<S>(stream: S, data: Vec<u8>) -> io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await?;
        Ok::<_, io::Error>(w)
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await?;
    // Keep the write half alive until the read side is done: dropping it early would reset.
    let _w = writer.await.unwrap()?;
    Ok(got)
}
