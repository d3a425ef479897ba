//! A read-ahead buffer under a TLS stream.
//!
//! rustls pulls ciphertext in pieces of at most one record (16 KiB) per `read_tls`, so a TLS
//! stream straight on a socket makes one `recv` per record: at 10 Gbit/s that is 76,000 system
//! calls a second, each of which also sends the peer a window update. Reading up to
//! [`AHEAD`] at once and handing rustls its records from memory costs one extra copy of the
//! ciphertext but a sixteenth of the calls, which is cheaper on every machine we measured
//! (figures in docs/architecture.md).
//!
//! Reads go straight to the caller until one fills the caller's buffer; only then is the buffer
//! allocated, and it is released again after a refill that found less than a record, so
//! interactive and idle connections hold no buffer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::relay::Endpoint;

/// The buffer, allocated once a read fills the caller's buffer (a bulk transfer).
const AHEAD: usize = 256 * 1024;
/// A refill smaller than one full TLS record means the burst is over.
const SMALL_REFILL: usize = 16 * 1024;

/// Buffers reads from `T` in large pieces; writes go straight through.
#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// The last refill was small: drop the buffer once it is drained.
    small_refill: bool,
    /// Since when writes are blocked (the socket takes no more).
    blocked_since: Option<tokio::time::Instant>,
    /// Fires [`crate::zero_window::STALL_CHECK`] into a block, when the peer is asked about
    /// (see [`Endpoint::hold_on`]). Made at the first block and kept: a bulk upload blocks and
    /// unblocks thousands of times a second, and re-arming a timer each time would cost more
    /// than the check is worth; it is re-armed at most once per interval.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// `hold_on` took effect: undo it once a write goes through.
    holding_on: bool,
}

impl<T> ReadAhead<T> {
    /// Wraps `inner` with no buffer allocated yet.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            small_refill: false,
            blocked_since: None,
            stall: None,
            holding_on: false,
        }
    }
}

impl<T: Endpoint> ReadAhead<T> {
    /// Watches for a peer that takes no bytes: the edge, when the VM service behind it stops
    /// reading, shows a zero window; with TCP_USER_TIMEOUT set, Linux ends a connection whose
    /// window stays shut that long even though the peer answers every probe, so a database
    /// that paused reading an upload for 45 s lost it in direct mode only (a tester's finding).
    fn watch(&mut self, cx: &mut Context<'_>, blocked: bool) {
        use crate::zero_window::STALL_CHECK;
        if !blocked {
            self.blocked_since = None;
            if std::mem::take(&mut self.holding_on) {
                self.inner.stop_holding_on();
            }
            return;
        }
        let now = tokio::time::Instant::now();
        let since = *self.blocked_since.get_or_insert(now);
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(since + STALL_CHECK)));
        // A timer armed for an earlier block fires early for this one: it is then set to this
        // block's due time.
        while stall.as_mut().poll(cx).is_ready() {
            if now >= since + STALL_CHECK {
                if !self.holding_on {
                    self.holding_on = self.inner.hold_on();
                }
                self.blocked_since = Some(now);
                stall.as_mut().reset(now + STALL_CHECK);
            } else {
                stall.as_mut().reset(since + STALL_CHECK);
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.end {
            if this.small_refill {
                // The socket had less than a record ready: buffering buys nothing until it
                // fills a caller's buffer again, and an idle connection should hold no buffer.
                this.buf = Vec::new();
                this.small_refill = false;
            }
            if this.buf.is_empty() {
                let wanted = dst.remaining();
                let before = dst.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, dst))?;
                if wanted > 0 && dst.filled().len() - before == wanted {
                    // The socket had at least as much as asked for: a bulk transfer.
                    this.buf = vec![0; AHEAD];
                }
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let got = rb.filled().len();
            if got == 0 {
                return Poll::Ready(Ok(()));
            }
            this.small_refill = got < SMALL_REFILL;
            this.pos = 0;
            this.end = got;
        }
        let n = dst.remaining().min(this.end - this.pos);
        dst.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: Endpoint> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, r.is_pending());
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: Endpoint> Endpoint for ReadAhead<T> {
    fn abort(&self) {
        self.inner.abort();
    }

    fn before_shutdown(&self) {
        self.inner.before_shutdown();
    }

    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.inner.poll_reset(cx)
    }

    fn hold_on(&self) -> bool {
        self.inner.hold_on()
    }

    fn stop_holding_on(&self) {
        self.inner.stop_holding_on();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Every byte arrives once and in order, whatever piece sizes the reader asks for (rustls
    /// asks for 4–18 KiB), across the switch to buffering and back.
    #[tokio::test]
    async fn bytes_in_equal_bytes_out_for_any_read_size() {
        let (mut tx, rx) = pair().await;
        let data: Vec<u8> = (0..8 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            // A bulk phase, then a trickle of small writes with pauses, then bulk again.
            tx.write_all(&sent[..4 << 20]).await.unwrap();
            for chunk in sent[4 << 20..(4 << 20) + 4000].chunks(100) {
                tx.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tx.write_all(&sent[(4 << 20) + 4000..]).await.unwrap();
        });
        let mut rx = ReadAhead::new(rx);
        let mut got = Vec::with_capacity(data.len());
        let sizes = [4096usize, 18 * 1024, 1, 100, 300 * 1024, 16 * 1024 + 5];
        let mut i = 0;
        while got.len() < data.len() {
            let mut piece = vec![0u8; sizes[i % sizes.len()]];
            i += 1;
            let n = rx.read(&mut piece).await.unwrap();
            assert_ne!(n, 0, "EOF after {} of {} bytes", got.len(), data.len());
            got.extend_from_slice(&piece[..n]);
        }
        writer.await.unwrap();
        assert!(got == data, "bytes differ");
        assert_eq!(
            rx.read(&mut [0u8; 16]).await.unwrap(),
            0,
            "EOF after the data"
        );
    }

    /// Small messages never allocate the buffer; a bulk burst does, and the first small refill
    /// after it gives the buffer back once drained.
    #[tokio::test]
    async fn buffer_only_while_bulk() {
        let (mut tx, rx) = pair().await;
        let mut rx = ReadAhead::new(rx);
        let mut piece = vec![0u8; 4096];
        for _ in 0..10 {
            tx.write_all(b"ping").await.unwrap();
            assert_eq!(rx.read(&mut piece).await.unwrap(), 4);
            assert_eq!(
                rx.buf.capacity(),
                0,
                "interactive traffic must not allocate"
            );
        }
        let bulk = tokio::spawn(async move {
            tx.write_all(&vec![7u8; 1 << 20]).await.unwrap();
            tx
        });
        let mut total = 0;
        let mut peak = 0;
        while total < 1 << 20 {
            total += rx.read(&mut piece).await.unwrap();
            peak = peak.max(rx.buf.capacity());
        }
        assert_eq!(peak, AHEAD, "a bulk burst reads ahead");
        let mut tx = bulk.await.unwrap();
        tx.write_all(b"tail").await.unwrap();
        assert_eq!(rx.read(&mut piece).await.unwrap(), 4);
        assert_eq!(rx.pos, rx.end, "nothing left buffered");
        tx.write_all(b"next").await.unwrap();
        assert_eq!(rx.read(&mut piece).await.unwrap(), 4);
        assert_eq!(
            rx.buf.capacity(),
            0,
            "a quiet connection gave the buffer back"
        );
    }

    /// A peer that stops reading for longer than the socket's TCP_USER_TIMEOUT but answers
    /// every window probe is waited for: Linux cut such a connection (a direct upload to a VM
    /// service that paused reading for 45 s was reset), and every byte must still arrive.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_peer_that_stops_reading_outlasts_the_dead_path_timeout() {
        let (tx, mut rx) = pair().await;
        let limit = Duration::from_secs(8);
        socket2::SockRef::from(&tx)
            .set_tcp_user_timeout(Some(limit))
            .unwrap();
        let data: Vec<u8> = (0..48 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let mut tx = ReadAhead::new(tx);
            tx.write_all(&sent).await?;
            tx.shutdown().await
        });
        // Nothing read for the timeout and then some: the window stays shut all along.
        tokio::time::sleep(limit + Duration::from_secs(6)).await;
        let mut got = Vec::with_capacity(data.len());
        rx.read_to_end(&mut got).await.unwrap();
        writer
            .await
            .unwrap()
            .expect("the writer was cut off while the reader paused");
        assert!(
            got == data,
            "{} of {} bytes, or different ones",
            got.len(),
            data.len()
        );
    }
}
