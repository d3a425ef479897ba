//! One forwarded connection as a QUIC bidirectional stream, usable by the relay on both sides.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use quinn::{ReadError, RecvStream, SendStream, StoppedError, VarInt, WriteError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::client::Lease;
use super::code;
use super::window::WindowFit;
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
    /// The agent refused the stream unprocessed (`GOING_AWAY`): it may be opened again.
    unprocessed: AtomicBool,
    /// The client's hold on its connection: tells the carrier when the agent says it is
    /// shutting down (new streams go to a new connection while this one drains), and when the
    /// connection has no streams left.
    lease: Option<Lease>,
    /// Client: what to send again on a new connection if this one is reset before the agent
    /// was heard from (see [`Replay`]).
    replay: Option<Box<Replay>>,
    /// The connection's send window sizing, told what this stream writes.
    fit: Option<Arc<WindowFit>>,
}

/// A client stream's way back from an agent restart it could not know of.
///
/// A killed agent forgets its connections; the client learns of it only when its next packet
/// draws the new agent's stateless reset. A stream opened in between (up to a keepalive, 3 s)
/// went out on the forgotten connection and was reset. The reset proves the new agent never saw
/// the stream; the old one did not either if the reset is the only datagram that came since the
/// stream opened (a live agent acknowledges within its ACK delay). Then the stream is opened
/// again on a new connection and what it had sent is sent again, so the user's connection
/// carries on. Only once, only up to [`REPLAY_CAP`] bytes, and only until anything arrives.
pub(super) struct Replay {
    /// Opens the new stream (the carrier's own open, without a replay of its own).
    reopen: Box<dyn Fn() -> Reopening + Send + Sync>,
    /// The connection the stream was opened on, and its datagram count just before.
    conn: quinn::Connection,
    rx_at_open: u64,
    /// Every byte written so far.
    sent: Vec<u8>,
    state: ReplayState,
    /// Tasks that wait for the replay besides the one driving it (the reading and the writing
    /// half may be polled from two tasks): woken when it is done.
    waiting: Vec<std::task::Waker>,
}

/// The future of a new stream for [`Replay`].
pub(super) type Reopening =
    Pin<Box<dyn Future<Output = Result<QuicStream, super::QuicError>> + Send>>;

enum ReplayState {
    /// Keeping what is sent.
    Armed,
    /// The connection was reset or the stream refused (why: the error, for the message if
    /// the new stream fails too): opening the new stream.
    Reopening(Reopening, String),
    /// On the new stream: re-sending `sent[pos..]`.
    Resending { pos: usize },
}

/// The most a stream keeps for a replay: a request, a handshake, not an upload.
const REPLAY_CAP: usize = 64 * 1024;

impl Replay {
    pub(super) fn new(
        conn: quinn::Connection,
        rx_at_open: u64,
        reopen: Box<dyn Fn() -> Reopening + Send + Sync>,
    ) -> Box<Self> {
        Box::new(Self {
            reopen,
            conn,
            rx_at_open,
            sent: Vec::new(),
            state: ReplayState::Armed,
            waiting: Vec::new(),
        })
    }
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
            unprocessed: AtomicBool::new(false),
            lease: None,
            replay: None,
            fit: None,
        }
    }

    pub(super) fn with_fit(mut self, fit: Arc<WindowFit>) -> Self {
        self.fit = Some(fit);
        self
    }

    pub(super) fn with_lease(mut self, lease: Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    pub(super) fn with_replay(mut self, replay: Box<Replay>) -> Self {
        self.replay = Some(replay);
        self
    }

    /// After a lost connection: `Ready(Ok)` once the stream is open again on a new connection
    /// with everything re-sent (retry the operation), `Ready(Err(e))` with `e` when it cannot
    /// or must not be replayed.
    fn poll_replay(&mut self, cx: &mut Context<'_>, e: io::Error) -> Poll<io::Result<()>> {
        let mut waiting = Vec::new();
        let outcome = self.poll_replay_inner(cx, e, &mut waiting);
        match &outcome {
            Poll::Pending => {
                if let Some(r) = self.replay.as_mut() {
                    if !r.waiting.iter().any(|w| w.will_wake(cx.waker())) {
                        r.waiting.push(cx.waker().clone());
                    }
                }
            }
            Poll::Ready(_) => waiting.into_iter().for_each(std::task::Waker::wake),
        }
        outcome
    }

    /// [`QuicStream::poll_replay`] without the bookkeeping of who waits; when the replay ends
    /// (done or given up), its waiters are moved to `waiting` to be woken.
    fn poll_replay_inner(
        &mut self,
        cx: &mut Context<'_>,
        e: io::Error,
        waiting: &mut Vec<std::task::Waker>,
    ) -> Poll<io::Result<()>> {
        let Some(r) = self.replay.as_mut() else {
            return Poll::Ready(Err(e));
        };
        if matches!(r.state, ReplayState::Armed) {
            // Refused unprocessed: the refusal itself says the agent never dialled.
            let unprocessed = self.unprocessed.load(Ordering::Relaxed);
            let only_the_reset =
                matches!(r.conn.close_reason(), Some(quinn::ConnectionError::Reset))
                    && r.conn.stats().udp_rx.datagrams == r.rx_at_open + 1;
            if !(unprocessed || only_the_reset) || self.aborted.load(Ordering::Relaxed) {
                if let Some(r) = self.replay.take() {
                    waiting.extend(r.waiting);
                }
                return Poll::Ready(Err(e));
            }
            let why = if unprocessed {
                "the agent shut down before it took this stream"
            } else {
                "the agent restarted before it saw this stream"
            };
            tracing::info!(
                target = %self.target,
                bytes = r.sent.len(),
                "{why}: opening it again on a new connection"
            );
            r.state = ReplayState::Reopening((r.reopen)(), e.to_string());
        }
        loop {
            let r = self.replay.as_mut().expect("checked above");
            match &mut r.state {
                ReplayState::Armed => unreachable!("left above"),
                ReplayState::Reopening(fut, cause) => match ready!(fut.as_mut().poll(cx)) {
                    Ok(mut fresh) => {
                        r.state = ReplayState::Resending { pos: 0 };
                        std::mem::swap(&mut self.send, &mut fresh.send);
                        std::mem::swap(&mut self.recv, &mut fresh.recv);
                        std::mem::swap(&mut self.lease, &mut fresh.lease);
                        std::mem::swap(&mut self.fit, &mut fresh.fit);
                        self.acked = None;
                        self.peer_stop = None;
                        self.unprocessed.store(false, Ordering::Relaxed);
                        // `fresh` now holds the dead connection's halves; dropping it resets
                        // them, which reaches nobody.
                    }
                    Err(reopen) => {
                        // The first cause, not `e`: a poll of the other half of a split stream
                        // comes here with a placeholder.
                        let msg = format!("{cause}; opening it again failed: {reopen}");
                        if let Some(r) = self.replay.take() {
                            waiting.extend(r.waiting);
                        }
                        return Poll::Ready(Err(io::Error::new(e.kind(), msg)));
                    }
                },
                ReplayState::Resending { pos } => {
                    while *pos < r.sent.len() {
                        let n = match ready!(SendStream::poll_write(
                            Pin::new(&mut self.send),
                            cx,
                            &r.sent[*pos..]
                        )) {
                            Ok(n) => n,
                            Err(we) => {
                                let we = self.write_error(we);
                                if let Some(r) = self.replay.take() {
                                    waiting.extend(r.waiting);
                                }
                                return Poll::Ready(Err(we));
                            }
                        };
                        *pos += n;
                    }
                    // Once only: a second loss is an error like any other.
                    if let Some(r) = self.replay.take() {
                        waiting.extend(r.waiting);
                    }
                    if self.finished {
                        if let Err(fe) = self.send.finish() {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::NotConnected,
                                fe,
                            )));
                        }
                        self.acked = Some(Box::pin(self.send.stopped()));
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }

    /// A replay that another poll (the other half of a split stream) started is finished
    /// before the streams are touched: they are being swapped.
    fn poll_replay_in_progress(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self
            .replay
            .as_ref()
            .is_some_and(|r| !matches!(r.state, ReplayState::Armed))
        {
            let e = io::Error::new(io::ErrorKind::ConnectionAborted, "replaying");
            return self.poll_replay(cx, e);
        }
        Poll::Ready(Ok(()))
    }

    /// After `e` on the streams: `Ready(Ok)` when a replay mended it (retry the operation),
    /// else `e`, and the stream will never be replayed.
    fn poll_recover(&mut self, cx: &mut Context<'_>, e: io::Error) -> Poll<io::Result<()>> {
        // Only a lost connection or a stream the agent did not take may be mended;
        // `poll_replay` decides whether this one is.
        let unprocessed = self.unprocessed.load(Ordering::Relaxed);
        if self.replay.is_none() || !(unprocessed || e.kind() == io::ErrorKind::ConnectionAborted) {
            self.replay = None;
            return Poll::Ready(Err(e));
        }
        self.poll_replay(cx, e)
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
        if code == code::SHUTTING_DOWN || code == code::GOING_AWAY {
            if let Some(lease) = &self.lease {
                lease.going_away();
            }
        }
        if code == code::GOING_AWAY {
            self.unprocessed.store(true, Ordering::Relaxed);
        }
        use crate::policy::Refusal;
        let msg = match code {
            code::NOT_ALLOWED => Refusal::NotAllowed.message(t),
            code::REFUSED => Refusal::Refused.message(t),
            code::TIMEOUT => Refusal::Timeout.message(t),
            code::UNREACHABLE => Refusal::Unreachable.message(t),
            code::BAD_HEADER => format!("agent rejected the target header for {t}"),
            code::AUTH_REQUIRED => {
                "agent rejected a stream opened before authentication".to_owned()
            }
            code::SHUTTING_DOWN => format!("agent is shutting down: stream to {t} reset"),
            code::GOING_AWAY => {
                format!("agent is shutting down: it did not take the stream to {t}")
            }
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

impl QuicStream {
    /// Up to `max` received bytes as quinn's chunks, appended to `out`; `Ok(0)` is EOF. Bytes
    /// taken before an error are dropped with it: the relay resets both sides on an error.
    fn poll_chunks(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        if self.read_eof || max == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut taken = 0;
        loop {
            ready!(self.poll_replay_in_progress(cx))?;
            // `read_chunk` is cancel-safe: a fresh future per call registers the waker as
            // `poll_read` does.
            let next = std::pin::pin!(self.recv.read_chunk(max - taken, true)).poll(cx);
            match next {
                Poll::Pending if taken == 0 => return Poll::Pending,
                Poll::Pending => return Poll::Ready(Ok(taken)),
                Poll::Ready(Ok(Some(chunk))) => {
                    self.heard_from_agent();
                    taken += chunk.bytes.len();
                    out.push_back(chunk.bytes);
                    if taken >= max {
                        return Poll::Ready(Ok(taken));
                    }
                }
                Poll::Ready(Ok(None)) => {
                    self.heard_from_agent();
                    // quinn answers `None` again, but the relay is told only once.
                    self.read_eof = true;
                    return Poll::Ready(Ok(taken));
                }
                Poll::Ready(Err(e)) => {
                    let e = self.read_error(e);
                    if taken > 0 {
                        return Poll::Ready(Err(e));
                    }
                    ready!(self.poll_recover(cx, e))?;
                }
            }
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
        loop {
            ready!(this.poll_replay_in_progress(cx))?;
            let before = buf.filled().len();
            match ready!(this.recv.poll_read_buf(cx, buf)) {
                Ok(()) => {
                    if buf.filled().len() == before {
                        this.read_eof = true;
                    }
                    this.heard_from_agent();
                    return Poll::Ready(Ok(()));
                }
                Err(e) => {
                    let e = this.read_error(e);
                    ready!(this.poll_recover(cx, e))?;
                }
            }
        }
    }
}

/// Bytes of a write handed to quinn on their own before the rest. quinn copies stream data
/// into each packet 20 bytes in; where packets are large (loopback, jumbo frames) and quinn has
/// drained what it had, a packet starts at a write's own page-aligned copy, and a copy that
/// lands 1 to 31 bytes past its source (modulo 4 KiB) runs at 2 GB/s instead of ~40 on AMD Zen
/// with glibc (docs/architecture.md). With a short head first, the packet's large copy starts
/// 1 KiB further in. The head is below the size where glibc copies with `rep movsb`.
const WRITE_HEAD: usize = 1024;

impl QuicStream {
    /// When the client opened it (client streams only).
    pub(super) fn opened(&self) -> Option<tokio::time::Instant> {
        self.lease.as_ref().map(Lease::opened)
    }

    /// Bytes or the end arrived from the agent: it saw the stream, so nothing may be sent
    /// twice, and the connection is not silent since this stream opened.
    fn heard_from_agent(&mut self) {
        self.replay = None;
        if let Some(lease) = &self.lease {
            lease.answered();
        }
    }

    /// One write to quinn, recovering as [`QuicStream::poll_recover`] allows.
    fn poll_write_once(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.poll_replay_in_progress(cx))?;
            let written = SendStream::poll_write(Pin::new(&mut self.send), cx, buf);
            if let Some(lease) = &self.lease {
                // A VM service that stopped reading keeps this stream's window in the agent;
                // the client sees only that quinn takes no more (see `Link::stalled`).
                lease.send_blocked(written.is_pending());
            }
            match ready!(written) {
                Ok(n) => {
                    if let Some(fit) = &self.fit {
                        fit.wrote(self.send.id(), n);
                    }
                    if let Some(r) = self.replay.as_mut() {
                        if r.sent.len() + n > REPLAY_CAP {
                            self.replay = None;
                        } else {
                            r.sent.extend_from_slice(&buf[..n]);
                        }
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) => {
                    let e = self.write_error(e);
                    ready!(self.poll_recover(cx, e))?;
                }
            }
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
        if buf.len() < 2 * WRITE_HEAD || this.replay.is_some() {
            return this.poll_write_once(cx, buf);
        }
        let n = ready!(this.poll_write_once(cx, &buf[..WRITE_HEAD]))?;
        if n < WRITE_HEAD {
            return Poll::Ready(Ok(n));
        }
        match this.poll_write_once(cx, &buf[WRITE_HEAD..]) {
            Poll::Ready(Ok(m)) => Poll::Ready(Ok(n + m)),
            // The head is quinn's already, so it is what this call wrote. A lasting error
            // (stream stopped, connection lost) comes back at the next write.
            Poll::Ready(Err(_)) | Poll::Pending => Poll::Ready(Ok(n)),
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
        loop {
            ready!(this.poll_replay_in_progress(cx))?;
            let Some(acked) = this.acked.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            // Done only when the peer acknowledged everything: closing the connection
            // afterwards cannot lose the tail of the stream.
            let outcome = ready!(acked.as_mut().poll(cx));
            this.acked = None;
            let e = match outcome {
                Ok(None) => return Poll::Ready(Ok(())),
                Ok(Some(c)) => this.code_error(c),
                Err(StoppedError::ConnectionLost(e)) => this.lost_error(&e),
                Err(e) => io::Error::other(e),
            };
            // Re-sent and finished again on the new stream: wait for its acknowledgement.
            ready!(this.poll_recover(cx, e))?;
        }
    }
}

impl Endpoint for QuicStream {
    fn abort(&self) {
        self.aborted.store(true, Ordering::Relaxed);
    }

    fn sink_blocked(&self, blocked: bool) {
        if let Some(lease) = &self.lease {
            lease.sink_blocked(blocked);
        }
    }

    /// quinn's received chunks themselves, not a copy into the relay's buffer: that copy was
    /// the largest `memmove` of a QUIC download in forward and of an upload in the agent.
    fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut VecDeque<Bytes>,
    ) -> Option<Poll<io::Result<usize>>> {
        Some(self.poll_chunks(cx, max, out))
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
        if let Some(fit) = &self.fit {
            fit.closed(self.send.id());
        }
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
