//! A carrier that ends in order must not cost a stream bytes it was sent whole: an agent that
//! drains and closes right after its last FIN, a client that exits right after its last upload
//! "finished" (its FIN queued, not sent), a carrier that breaks after a stream's FIN arrived.
//! Streams that were still mid-transfer are reset, never ended cleanly.
//!
//! Two carriers over an in-memory pipe, so only the carrier and session logic is under test;
//! bytes are compared by SHA-256.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forward_mux::{Config, Session, StreamId, Target};
use forward_tunnel::carrier::{Carrier, MuxStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedReceiver;

/// A deadline against hangs only.
async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing happened within 30 s"))
}

struct Pair {
    client: Arc<Carrier>,
    server: Arc<Carrier>,
    opened: UnboundedReceiver<(StreamId, Target)>,
}

/// An authenticated client/server pair over the two ends of one byte stream.
async fn pair_over<S>(a: S, b: S) -> Pair
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let now = Instant::now();
    let (client, _) = Carrier::start(
        a,
        Session::client(Config::default(), now),
        vec![],
        "client".into(),
    );
    let (server, opened) = Carrier::start(
        b,
        Session::server(Config::default(), now),
        vec![],
        "server".into(),
    );
    client.send_auth(b"proof").unwrap();
    within("auth request", server.wait_auth_request())
        .await
        .unwrap();
    server.decide_auth(true);
    within("auth", client.wait_authed()).await.unwrap();
    Pair {
        client,
        server,
        opened: opened.expect("a server carrier reports opened streams"),
    }
}

async fn pair() -> Pair {
    let (a, b) = tokio::io::duplex(1 << 20);
    pair_over(a, b).await
}

impl Pair {
    async fn stream(&mut self) -> (MuxStream, MuxStream) {
        let c = self.client.open(Target::new("", 80).unwrap()).unwrap();
        let (id, _) = within("OPEN", self.opened.recv()).await.unwrap();
        (c, self.server.accept(id).unwrap())
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn sha(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

async fn read_all(s: &mut MuxStream) -> (Vec<u8>, std::io::Result<usize>) {
    let mut got = Vec::new();
    let r = within("reading to the end", s.read_to_end(&mut got)).await;
    (got, r)
}

#[tokio::test]
async fn a_drained_agent_that_closes_after_its_last_fin_loses_no_byte_the_client_holds() {
    let mut p = pair().await;
    let (mut c, mut s) = p.stream().await;
    c.write_all(b"request").await.unwrap();
    c.shutdown().await.unwrap();
    let (req, r) = read_all(&mut s).await;
    r.unwrap();
    assert_eq!(req, b"request");
    // Within the first window: the client's local side has not read any of it yet.
    let answer = pattern(200_000, 1);
    within("the answer", s.write_all(&answer)).await.unwrap();
    s.shutdown().await.unwrap();
    drop(s);
    // The agent's drain: GOAWAY, wait until no stream is left, close.
    p.server.go_away("agent shutting down");
    within("the drain", async {
        while p.server.stream_count() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    p.server.close("agent shutting down");
    within("the client to see the end", p.client.closed()).await;
    // Only now does the local side read: a reader slower than the carrier.
    let (got, r) = read_all(&mut c).await;
    r.expect("a finished stream reads to its end after the carrier closed");
    assert_eq!(got.len(), answer.len());
    assert_eq!(sha(&got), sha(&answer));
    assert_eq!(
        p.client.streams_cut(),
        0,
        "a complete stream is not counted as cut"
    );
}

#[tokio::test]
async fn a_client_that_exits_after_its_last_upload_finished_delivers_all_of_it() {
    let mut p = pair().await;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let (mut c, mut s) = p.stream().await;
        // The far side half-closes first (a sink), as ssh's or a log shipper's server may.
        s.shutdown().await.unwrap();
        let (none, r) = read_all(&mut c).await;
        r.unwrap();
        assert!(none.is_empty());
        streams.push((c, s));
    }
    // Then the uploads "finish" as the relay sees it: the session takes every byte (within
    // the window) and the FIN, and the client exits at once, before its writer ran.
    let mut uploads = Vec::new();
    for (seed, (c, _)) in streams.iter_mut().enumerate() {
        let upload = pattern(200_000, seed as u8);
        c.write_all(&upload).await.unwrap();
        c.shutdown().await.unwrap();
        uploads.push(upload);
    }
    let closing = {
        let client = p.client.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            client.close_flushed("client exiting", deadline).await;
        })
    };
    for ((c, mut s), upload) in streams.into_iter().zip(uploads) {
        drop(c);
        let (got, r) = read_all(&mut s).await;
        r.expect("a finished upload reads to its end");
        assert_eq!(got.len(), upload.len());
        assert_eq!(sha(&got), sha(&upload));
    }
    within("close_flushed", closing).await.unwrap();
}

#[tokio::test]
async fn a_broken_carrier_keeps_streams_that_had_ended_and_resets_the_others() {
    // Real TCP, so the server's socket can end under its carrier: a duplicate of its file
    // descriptor shuts the write side, and the client reads an end without any GOAWAY.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let b = l.accept().await.unwrap().0.into_std().unwrap();
    let breaker = b.try_clone().unwrap();
    let b = tokio::net::TcpStream::from_std(b).unwrap();
    let mut p = pair_over(a, b).await;
    let (mut done_c, mut done_s) = p.stream().await;
    let (mut mid_c, mut mid_s) = p.stream().await;
    let whole = pattern(100_000, 3);
    done_s.write_all(&whole).await.unwrap();
    done_s.shutdown().await.unwrap();
    mid_s.write_all(&pattern(50_000, 4)).await.unwrap();
    done_c.shutdown().await.unwrap();
    // Let both arrive, then end the carrier under the server, without any GOAWAY.
    tokio::time::sleep(Duration::from_millis(200)).await;
    breaker.shutdown(std::net::Shutdown::Write).unwrap();
    within("the client to see the break", p.client.closed()).await;

    let (got, r) = read_all(&mut done_c).await;
    r.expect("a stream whose FIN had arrived ends cleanly");
    assert_eq!(sha(&got), sha(&whole));
    let (_, r) = read_all(&mut mid_c).await;
    let e = r.expect_err("a stream cut mid-transfer is an error, never a clean end");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(
        mid_c.write_all(b"more").await.is_err(),
        "writing on a dead carrier fails"
    );
    drop(mid_s);
}
