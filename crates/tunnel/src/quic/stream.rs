//! One forwarded connection as a QUIC bidirectional stream, usable by the relay on both sides.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use quinn::{ReadError, RecvStream, SendStream, StoppedError, VarInt, WriteError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::client::Lease;
use super::code;
use crate::relay::Endpoint;

type Acked = Pin<Box<dyn Future<Output = Result<Option<VarInt>, StoppedError>> + Send>>;

/// A QUIC bidirectional stream as a byte stream: `shutdown` sends FIN and completes once the
/// peer acknowledged every byte, the peer's FIN reads as EOF, resets and a lost connection read
/// as errors. Dropped without `shutdown` (or after [`Endpoint::abort`]) it resets both ways.
pub struct QuicStream {
    send: SendStream,
    recv: RecvStream,
    /// Who is at the other end, for error messages: "agent" or "client".
    peer: &'static str,
    /// What the stream reaches, for error messages.
    target: Arc<str>,
    finished: bool,
    acked: Option<Acked>,
    /// Watches for the peer's STOP_SENDING once our read side ended (see `poll_reset`).
    peer_stop: Option<Acked>,
    read_eof: bool,
    aborted: AtomicBool,
    /// The client's hold on its connection: tells the carrier when the agent says it is
    /// shutting down (new streams go to a new connection while this one drains), and when the
    /// connection has no streams left.
    lease: Option<Lease>,
}

impl std::fmt::Debug for QuicStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuicStream({} to {})", self.send.id(), self.target)
    }
}

impl QuicStream {
    pub(super) fn new(
        send: SendStream,
        recv: RecvStream,
        peer: &'static str,
        target: Arc<str>,
    ) -> Self {
        Self {
            send,
            recv,
            peer,
            target,
            finished: false,
            acked: None,
            peer_stop: None,
            read_eof: false,
            aborted: AtomicBool::new(false),
            lease: None,
        }
    }

    pub(super) fn with_lease(mut self, lease: Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Resets both directions with an application code (see [`code`]) right away.
    pub fn reset(&mut self, code: u32) {
        self.aborted.store(true, Ordering::Relaxed);
        let _ = self.send.reset(VarInt::from_u32(code));
        let _ = self.recv.stop(VarInt::from_u32(code));
    }

    /// The QUIC stream id.
    pub fn id(&self) -> quinn::StreamId {
        self.send.id()
    }

    fn code_error(&self, code: VarInt) -> io::Error {
        let t = &self.target;
        let p = self.peer;
        let code = u32::try_from(code.into_inner()).unwrap_or(u32::MAX);
        if code == code::SHUTTING_DOWN {
            if let Some(lease) = &self.lease {
                lease.going_away();
            }
        }
        let msg = match code {
            code::NOT_ALLOWED => format!(
                "agent refused {t}: not allowed by its policy (only the VM's loopback unless the agent runs with --allow)"
            ),
            code::REFUSED => format!("agent could not connect to {t}: connection refused (is the service running on the VM?)"),
            code::TIMEOUT => format!("agent timed out connecting to {t}"),
            code::UNREACHABLE => format!("agent cannot reach {t}"),
            code::BAD_HEADER => format!("agent rejected the target header for {t}"),
            code::AUTH_REQUIRED => "agent rejected a stream opened before authentication".to_owned(),
            code::SHUTTING_DOWN => format!("agent is shutting down: stream to {t} reset"),
            code::ABORTED => format!("stream to {t} reset by the {p} side"),
            other => format!("stream to {t} reset by the {p} (code {other})"),
        };
        io::Error::new(io::ErrorKind::ConnectionReset, msg)
    }

    fn lost_error(&self, e: &quinn::ConnectionError) -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!(
                "QUIC connection to the {} lost ({e}); stream to {} cut",
                self.peer, self.target
            ),
        )
    }

    fn read_error(&self, e: ReadError) -> io::Error {
        match e {
            ReadError::Reset(c) => self.code_error(c),
            ReadError::ConnectionLost(c) => self.lost_error(&c),
            other => io::Error::other(other),
        }
    }

    fn write_error(&self, e: WriteError) -> io::Error {
        match e {
            WriteError::Stopped(c) => self.code_error(c),
            WriteError::ConnectionLost(c) => self.lost_error(&c),
            other => io::Error::other(other),
        }
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read_eof || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match ready!(this.recv.poll_read_buf(cx, buf)) {
            Ok(()) => {
                if buf.filled().len() == before {
                    this.read_eof = true;
                }
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(this.read_error(e))),
        }
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match ready!(SendStream::poll_write(Pin::new(&mut this.send), cx, buf)) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(this.write_error(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // quinn sends as soon as congestion and flow control allow; nothing is held back.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.finished {
            this.finished = true;
            if let Err(e) = this.send.finish() {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, e)));
            }
            this.acked = Some(Box::pin(this.send.stopped()));
        }
        let Some(acked) = this.acked.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        // Done only when the peer acknowledged everything: closing the connection afterwards
        // cannot lose the tail of the stream.
        let outcome = ready!(acked.as_mut().poll(cx));
        this.acked = None;
        match outcome {
            Ok(None) => Poll::Ready(Ok(())),
            Ok(Some(c)) => Poll::Ready(Err(this.code_error(c))),
            Err(StoppedError::ConnectionLost(e)) => Poll::Ready(Err(this.lost_error(&e))),
            Err(e) => Poll::Ready(Err(io::Error::other(e))),
        }
    }
}

impl Endpoint for QuicStream {
    fn abort(&self) {
        self.aborted.store(true, Ordering::Relaxed);
    }

    /// A peer that aborts stops our sending half (STOP_SENDING), which is how a reset after
    /// its FIN reaches us.
    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.finished {
            return Poll::Pending;
        }
        let watch = self
            .peer_stop
            .get_or_insert_with(|| Box::pin(self.send.stopped()));
        match ready!(watch.as_mut().poll(cx)) {
            Ok(Some(c)) => Poll::Ready(self.code_error(c)),
            Err(StoppedError::ConnectionLost(e)) => Poll::Ready(self.lost_error(&e)),
            Err(e) => Poll::Ready(io::Error::other(e)),
            Ok(None) => {
                // Everything acknowledged: nothing left to reset. Never poll the spent future.
                self.peer_stop = Some(Box::pin(std::future::pending()));
                Poll::Pending
            }
        }
    }
}

impl Drop for QuicStream {
    fn drop(&mut self) {
        let aborted = self.aborted.load(Ordering::Relaxed);
        // quinn would finish a dropped send stream, which the peer would take for a complete
        // one: only an explicit shutdown may end it cleanly.
        if aborted || !self.finished {
            let _ = self.send.reset(VarInt::from_u32(code::ABORTED));
        }
        if aborted || !self.read_eof {
            let _ = self.recv.stop(VarInt::from_u32(code::ABORTED));
        }
    }
}
