//! The relay: moves bytes both ways between two connected endpoints until both directions end.
//!
//! ```text
//!             ┌──────── Half a→b ────────┐
//!   A.read ──►│ buf (16 KiB → 256 KiB)   │──► B.write ─► B.flush ─► (A EOF) B.shutdown
//!             └──────────────────────────┘
//!             ┌──────── Half b→a ────────┐
//!   A.write ◄─│ buf (16 KiB → 256 KiB)   │◄── B.read
//!             └──────────────────────────┘
//!        any error on either side ─► A.abort() + B.abort() (RST) ─► Err(RelayError)
//!        a side that half-closed and then resets (Endpoint::poll_reset) counts as an error
//! ```
//!
//! Both halves are polled from one future on the caller's task, as in linkerd2-proxy's `duplex`.
//! EOF is a half-close: it shuts down only the other side's write half (FIN, or close_notify for
//! TLS), and the other direction keeps flowing. Anything else — a read or write error, a reset, a
//! TLS stream that ends without close_notify — is an abortive close of both sides, so the peers see
//! a reset and never mistake a truncated stream for a complete one.
//!
//! Left to callers: socket options (TCP_NODELAY, keepalive), timeouts, logging with context.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// First buffer size: small, so idle and interactive connections stay cheap.
const INITIAL_BUF: usize = 16 * 1024;
/// Largest buffer: a TLS read yields at most ~16 KiB per record, a bulk transfer wants big writes.
const MAX_BUF: usize = 256 * 1024;
/// Where reads start in the relay's buffer (the bytes before it stay unused). On AMD Zen CPUs,
/// glibc's memcpy of 4 KiB and more runs at 2 GB/s instead of 40 when the destination lies 1 to
/// 31 bytes past the source, modulo 4 KiB (its `rep movsb` path). rustls copies every record it
/// sends to 5 bytes into a fresh allocation, page-aligned under mimalloc: from a page-aligned
/// relay buffer that is the slow case exactly, and it was 39 % of the client's CPU samples in a
/// direct upload. Half a page more keeps source and destination 2 KiB apart for that copy and
/// for the copy of received plaintext out of rustls (from offset 0 of a fresh allocation into
/// here), so an allocator that places its blocks a little differently stays clear of the
/// window too.
const SKEW: usize = 2048 + 5;
/// Bytes one direction of a relay moves per poll before it lets the runtime's other tasks run.
/// forward runs on one thread; without a share, a bulk transfer moved until its local socket's
/// send buffer was full (up to 4 MiB, a few milliseconds of decrypting and copying) while an
/// interactive connection's byte waited behind it.
const FAIR_SHARE: usize = MAX_BUF;
/// Tasks a busy runtime runs between looks at the sockets: every one. tokio's default is 61, and
/// with one bulk transfer always ready a byte on another connection went unseen for up to 61
/// of its shares: a 1-byte round trip beside a direct download took 37-61 ms p99 on loopback,
/// 13 ms at 1. (Deferring the share's wake until the runtime has polled for I/O, as tokio's
/// `yield_now` does, did as well for direct mode, but cost sixteen QUIC downloads together a
/// third of their throughput: the relays then refilled quinn's buffers only once its driver
/// had drained them.) The price is a non-blocking `epoll_wait` per task while the runtime is
/// busy, which the benchmark's CPU per Gbit/s did not show. Used by the binary's runtimes.
pub const EVENT_INTERVAL: u32 = 1;
/// First and longest wait between checks for a reset of a half-closed TCP side.
const RESET_WATCH_FIRST: Duration = Duration::from_millis(100);
const RESET_WATCH_MAX: Duration = Duration::from_secs(10);
/// Read into this stack buffer until the first byte arrives, so a connection that never sends
/// costs no heap buffer.
const PROBE_BUF: usize = 2 * 1024;
/// Most slices in one vectored write, here and in the carrier's writer (Linux takes 1024): 64
/// cover MAX_BUF in 4 KiB chunks, or a 256 KiB carrier batch of 16 KiB frames as 32 (header,
/// payload) pairs.
pub(crate) const MAX_IOV: usize = 64;

/// Grown buffers given back by relays whose sink has no room (and by relays that ended), per
/// thread, for the next relay that needs one: a stalled stream holds no buffer (at 1,000
/// stalled agent streams that was 250 MB), and a transfer that stalls and resumes thousands
/// of times a second takes a buffer back without allocating or zeroing one.
const POOL_MAX: usize = 4;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Smallest buffer worth keeping in the pool.
const POOL_MIN: usize = 64 * 1024;

/// A buffer of at least `len` bytes (contents unspecified): a pooled one if one is as big.
fn buffer(len: usize) -> Vec<u8> {
    if len >= POOL_MIN {
        let pooled = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            let i = pool.iter().position(|b| b.len() >= len)?;
            Some(pool.swap_remove(i))
        });
        if let Ok(Some(buf)) = pooled {
            return buf;
        }
    }
    vec![0; len]
}

/// Keeps `buf` for [`buffer`] if it is big enough to be worth it and the pool has room (else
/// the smallest pooled one makes way for a bigger one).
fn give_back(buf: Vec<u8>) {
    if buf.len() < POOL_MIN {
        return;
    }
    // `try_with`: a relay dropped while its thread exits (the pool already gone) just frees it.
    let _ = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_MAX {
            pool.push(buf);
        } else if let Some(smallest) = pool.iter_mut().min_by_key(|b| b.len()) {
            if smallest.len() < buf.len() {
                *smallest = buf;
            }
        }
    });
}

/// A byte stream the relay can drive, plus a way to make its close abortive.
///
/// `abort` is called on both sides when the relay fails; it must arrange that dropping the
/// endpoint resets the connection instead of closing it cleanly (for TCP: `SO_LINGER 0`).
pub trait Endpoint: AsyncRead + AsyncWrite + Unpin + Send {
    /// Make the coming close abortive. The default does nothing (pipes, stdio, in-memory streams).
    fn abort(&self) {}

    /// The relay is about to end this side's write direction in order (its source ended
    /// cleanly). A TCP socket armed with [`arm_reset_on_exit`] is disarmed here, so the FIN it
    /// sends and the close after it stay graceful. The default does nothing.
    fn before_shutdown(&self) {}

    /// Ready with an error once the peer reset the connection. The relay polls it only after
    /// this endpoint's read side ended: a peer that half-closes and then resets would
    /// otherwise go unnoticed for as long as the other side stays silent, and that side would
    /// wait forever for a client that is gone. The relay calls it when the side half-closes and
    /// then on a timer backing off from 0.1 s to 10 s (a reset is rare; a check per wakeup
    /// would tax every transfer). The default never fires (pipes, stdio).
    fn poll_reset(&mut self, _cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Pending
    }

    /// The peer has taken no bytes for a while ([`crate::readahead`] asks after
    /// [`crate::zero_window::STALL_CHECK`] of a blocked write). An endpoint that would give up
    /// on such a peer (a socket with TCP_USER_TIMEOUT) but can see that it is alive and only
    /// not reading (a zero window) stops giving up and returns true. The default: false.
    fn hold_on(&self) -> bool {
        false
    }

    /// Bytes move again after [`Endpoint::hold_on`] returned true: give up on a dead peer again.
    fn stop_holding_on(&self) {}

    /// For an endpoint that holds received bytes in memory already (a mux stream): appends up
    /// to `max` of them to `out` as they are, without a copy into the relay's buffer, and
    /// returns how many; 0 is EOF. `None` (the default): the relay reads with `poll_read`.
    fn poll_read_chunks(
        &mut self,
        _cx: &mut Context<'_>,
        _max: usize,
        _out: &mut VecDeque<Bytes>,
    ) -> Option<Poll<io::Result<usize>>> {
        None
    }

    /// Called after `n` bytes of the chunks `poll_read_chunks` handed out were written to the
    /// other side: an endpoint that keeps its peer's credit until then returns it here, so
    /// bytes a stalled sink holds in the relay still count against the peer's window. The
    /// default does nothing.
    fn chunks_written(&mut self, _n: usize) {}

    /// For an endpoint whose writes are bounded by room it knows (a mux stream: the peer's
    /// credit and its send buffer): the bytes `poll_write` would take now, or `Pending` (waker
    /// registered) until there is room. The relay reads no more than this from the other side,
    /// so a destination that does not drain holds nothing in the relay. `None` (the default):
    /// no such bound, the relay reads a buffer's worth.
    fn poll_write_room(&mut self, _cx: &mut Context<'_>) -> Option<Poll<io::Result<usize>>> {
        None
    }

    /// The relay's destination for this source's bytes took nothing and the relay stopped
    /// reading here (`true`), or it takes bytes again (`false`); called on each change. A
    /// source that keeps what arrives unread on behalf of its peer (a QUIC stream, in quinn's
    /// buffers) can tell from this that its reader stopped. The default does nothing.
    fn sink_blocked(&self, _blocked: bool) {}
}

/// Makes the socket's close abortive (SO_LINGER 0) until the relay disarms it before an
/// orderly shutdown ([`Endpoint::before_shutdown`]). For the sockets that carry a user's bytes
/// in the clear (a local client's, the agent's to its target): if the process dies (kill -9,
/// the OOM killer, a panic that aborts), the kernel then resets them instead of sending a FIN,
/// and a client that frames nothing itself (`nc > file`, an HTTP/1.0 body, a dump) does not
/// take a cut download for a whole one.
pub fn arm_reset_on_exit(s: &tokio::net::TcpStream) {
    if let Err(e) = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "could not set SO_LINGER 0 for an abortive close");
    }
}

impl Endpoint for tokio::net::TcpStream {
    fn abort(&self) {
        arm_reset_on_exit(self);
    }

    fn before_shutdown(&self) {
        if let Err(e) = socket2::SockRef::from(self).set_linger(None) {
            tracing::debug!(error = %e, "could not clear SO_LINGER before an orderly close");
        }
    }

    fn poll_reset(&mut self, _cx: &mut Context<'_>) -> Poll<io::Error> {
        poll_tcp_reset(self)
    }

    fn hold_on(&self) -> bool {
        crate::zero_window::hold_on(self)
    }

    fn stop_holding_on(&self) {
        crate::zero_window::stop_holding_on(self);
    }
}

/// A TCP socket whose read side saw EOF stays readable for good (tokio never clears the
/// read-closed readiness), so no readiness says "reset": an earlier version that waited on it
/// spun a core for as long as a connection stayed half-closed. The socket's pending error is
/// checked instead, on the relay's reset-watch timer (see [`relay`]).
fn poll_tcp_reset(s: &tokio::net::TcpStream) -> Poll<io::Error> {
    match s.take_error() {
        // After a FIN the kernel files an RST as EPIPE: say what happened instead.
        Ok(Some(e)) => Poll::Ready(io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("connection reset by the peer after its half-close ({e})"),
        )),
        Err(e) => Poll::Ready(e),
        Ok(None) => Poll::Pending,
    }
}

#[cfg(unix)]
impl Endpoint for tokio::net::UnixStream {}

impl Endpoint for tokio::io::DuplexStream {}

/// A TLS stream aborts and reports resets through the socket under it.
macro_rules! tls_endpoint {
    ($($ty:ident)::+) => {
        impl<T: Endpoint> Endpoint for $($ty)::+<T> {
            fn abort(&self) {
                self.get_ref().0.abort();
            }
            fn before_shutdown(&self) {
                self.get_ref().0.before_shutdown();
            }
            fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
                self.get_mut().0.poll_reset(cx)
            }
        }
    };
}
tls_endpoint!(tokio_rustls::client::TlsStream);
tls_endpoint!(tokio_rustls::server::TlsStream);
tls_endpoint!(tokio_rustls::TlsStream);

/// `Box<dyn Endpoint>` and `&mut impl Endpoint` are endpoints too, forwarding every method
/// (the defaults would silently drop a wrapped endpoint's chunked reads and resets).
macro_rules! delegate_endpoint {
    ($($ty:ty),*) => {$(
        impl<T: Endpoint + ?Sized> Endpoint for $ty {
            fn abort(&self) {
                (**self).abort();
            }
            fn before_shutdown(&self) {
                (**self).before_shutdown();
            }
            fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
                (**self).poll_reset(cx)
            }
            fn poll_read_chunks(
                &mut self,
                cx: &mut Context<'_>,
                max: usize,
                out: &mut VecDeque<Bytes>,
            ) -> Option<Poll<io::Result<usize>>> {
                (**self).poll_read_chunks(cx, max, out)
            }
            fn chunks_written(&mut self, n: usize) {
                (**self).chunks_written(n);
            }
            fn poll_write_room(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<usize>>> {
                (**self).poll_write_room(cx)
            }
            fn sink_blocked(&self, blocked: bool) {
                (**self).sink_blocked(blocked);
            }
        }
    )*};
}
delegate_endpoint!(Box<T>, &mut T);

/// Any byte stream with no way to reset it (a pipe, a test double): its abort does nothing.
#[derive(Debug)]
pub struct Plain<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Plain<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Plain<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Endpoint for Plain<T> {}

/// A reader and a writer used as one endpoint, e.g. stdin + stdout for `forward stdio`.
///
/// Shutting it down shuts down the writer (closing stdout tells the reading side "EOF").
#[derive(Debug)]
pub struct Joined<R, W> {
    /// Where the relay reads from.
    pub reader: R,
    /// Where the relay writes to.
    pub writer: W,
}

impl<R, W> Joined<R, W> {
    /// Pair `reader` and `writer` into one endpoint.
    pub fn new(reader: R, writer: W) -> Self {
        Self { reader, writer }
    }
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for Joined<R, W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().reader).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for Joined<R, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_shutdown(cx)
    }
}

impl<R, W> Endpoint for Joined<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
}

/// Bytes moved by a relay, per direction (counted when written to the other side).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes read from A and written to B.
    pub a_to_b: u64,
    /// Bytes read from B and written to A.
    pub b_to_a: u64,
}

/// Which way bytes were flowing when something failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the first argument of [`relay`] to the second.
    AToB,
    /// From the second argument of [`relay`] to the first.
    BToA,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::AToB => "a->b",
            Direction::BToA => "b->a",
        })
    }
}

/// What the relay was doing when an I/O error ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Reading from the source of the direction.
    Read,
    /// Writing or flushing to the sink of the direction.
    Write,
    /// Shutting down the sink's write half after the source ended.
    Shutdown,
}

/// A relay that ended with an error. Both sides were closed abortively (reset).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// Reading from the source failed: the peer reset, or a TLS stream ended without
    /// close_notify (truncation).
    #[error("{direction}: read from {} failed: {error}", source_side(*direction))]
    Read {
        /// The direction whose source failed.
        direction: Direction,
        /// The underlying error (`UnexpectedEof` for a TLS truncation).
        error: io::Error,
        /// Bytes moved before the failure.
        stats: RelayStats,
    },
    /// Writing, flushing or shutting down the sink failed: the peer reset or went away.
    #[error("{direction}: {} {} failed: {error}", op_verb(*op), sink_side(*direction))]
    Write {
        /// The direction whose sink failed.
        direction: Direction,
        /// Write (including flush) or shutdown.
        op: Op,
        /// The underlying error.
        error: io::Error,
        /// Bytes moved before the failure.
        stats: RelayStats,
    },
}

fn source_side(d: Direction) -> &'static str {
    match d {
        Direction::AToB => "a",
        Direction::BToA => "b",
    }
}

fn sink_side(d: Direction) -> &'static str {
    match d {
        Direction::AToB => "b",
        Direction::BToA => "a",
    }
}

fn op_verb(op: Op) -> &'static str {
    match op {
        Op::Read => "reading",
        Op::Write => "writing to",
        Op::Shutdown => "shutting down",
    }
}

impl RelayError {
    /// The direction that failed.
    pub fn direction(&self) -> Direction {
        match self {
            RelayError::Read { direction, .. } | RelayError::Write { direction, .. } => *direction,
        }
    }

    /// Whether side `a` ended the relay by resetting (or, over QUIC, stopping to read): a
    /// local client that cancelled, not a failure of the tunnel or of `b`. A lost QUIC
    /// connection is not that, nor is anything `b` did.
    pub fn reset_by_a(&self) -> bool {
        let a_side = matches!(
            (self, self.direction()),
            (RelayError::Read { .. }, Direction::AToB)
                | (RelayError::Write { .. }, Direction::BToA)
        );
        a_side && self.io_error().kind() == io::ErrorKind::ConnectionReset
    }

    /// The I/O error behind the failure.
    pub fn io_error(&self) -> &io::Error {
        match self {
            RelayError::Read { error, .. } | RelayError::Write { error, .. } => error,
        }
    }

    /// Bytes moved before the failure.
    pub fn stats(&self) -> RelayStats {
        match self {
            RelayError::Read { stats, .. } | RelayError::Write { stats, .. } => *stats,
        }
    }

    /// The error with the two sides named, for a log line a user can act on, e.g.
    /// `describe("local", "edge")` → `edge -> local: reading from edge failed: Connection reset
    /// by peer (os error 104); both sides reset`.
    pub fn describe(&self, a: &str, b: &str) -> String {
        self.describe_ending(a, b, "; both sides reset")
    }

    /// [`RelayError::describe`] with another `ending` for what the abort did to the peers: a
    /// Unix socket has no reset, and its client sees an end of stream.
    pub fn describe_ending(&self, a: &str, b: &str, ending: &str) -> String {
        let (src, dst) = match self.direction() {
            Direction::AToB => (a, b),
            Direction::BToA => (b, a),
        };
        match self {
            RelayError::Read { .. } if self.is_truncation() => format!(
                "{src} -> {dst}: {src} ended the stream without a clean close (TLS close_notify \
                 missing): truncated{ending}"
            ),
            RelayError::Read { error, .. } => {
                format!("{src} -> {dst}: reading from {src} failed: {error}{ending}")
            }
            RelayError::Write { op, error, .. } => format!(
                "{src} -> {dst}: {} {dst} failed: {error}{ending}",
                op_verb(*op)
            ),
        }
    }

    /// True when the source ended without a clean end of stream (a TLS close without
    /// close_notify), rather than with an explicit reset or error.
    pub fn is_truncation(&self) -> bool {
        matches!(self, RelayError::Read { error, .. } if error.kind() == io::ErrorKind::UnexpectedEof)
    }
}

/// Relay bytes between `a` and `b` in both directions until both directions have ended.
///
/// EOF from one side shuts down the other side's write half and the other direction goes on.
/// On any error both sides are aborted (the peers see a reset) and the error says which
/// direction failed. Both endpoints are dropped before this returns.
pub async fn relay<A: Endpoint, B: Endpoint>(mut a: A, mut b: B) -> Result<RelayStats, RelayError> {
    let mut a_to_b = Half::default();
    let mut b_to_a = Half::default();
    // Alternate which half goes first: under tokio's cooperative budget the half polled first
    // could otherwise use up every poll while both directions are saturated.
    let mut a_first = false;
    // Re-polls `poll_reset` of a half-closed side while the other direction still runs.
    let mut reset_watch: Option<(Pin<Box<tokio::time::Sleep>>, Duration)> = None;
    let result = poll_fn(|cx| {
        a_first = !a_first;
        for turn in 0..2 {
            let outcome = if (turn == 0) == a_first {
                a_to_b
                    .poll(cx, &mut a, &mut b)
                    .map_err(|(op, e)| (Direction::AToB, op, e))
            } else {
                b_to_a
                    .poll(cx, &mut b, &mut a)
                    .map_err(|(op, e)| (Direction::BToA, op, e))
            };
            if let Poll::Ready(Err(e)) = outcome {
                return Poll::Ready(Err(e));
            }
        }
        // A side that half-closed can still reset; nothing else would notice while the other
        // side is silent. Nor would it for a side whose bytes wait for room in the other: it
        // is not being read, so a client that gave up on a VM service that stopped reading
        // held both connections for as long as the service stayed stuck (a tester found them
        // after 9 minutes, and the agent's after a lost carrier).
        let watch_a = (a_to_b.read_eof && !b_to_a.done) || (a_to_b.sink_blocked && !a_to_b.done);
        let watch_b = (b_to_a.read_eof && !a_to_b.done) || (b_to_a.sink_blocked && !b_to_a.done);
        if watch_a || watch_b {
            // Look when a side first half-closes and on each tick after, not on every wakeup:
            // during a transfer that would cost a syscall (TCP) or a lock (QUIC) per poll.
            let due = match &mut reset_watch {
                None => {
                    reset_watch = Some((
                        Box::pin(tokio::time::sleep(RESET_WATCH_FIRST)),
                        RESET_WATCH_FIRST,
                    ));
                    true
                }
                Some((sleep, period)) => {
                    // Registered when armed (below); polling it on every wakeup of a transfer
                    // whose sink keeps filling up cost direct mode 2 points of CPU per Gbit/s.
                    let fired = sleep.is_elapsed();
                    if fired {
                        *period = (*period * 2).min(RESET_WATCH_MAX);
                        sleep.as_mut().reset(tokio::time::Instant::now() + *period);
                    }
                    fired
                }
            };
            if due {
                if watch_a {
                    if let Poll::Ready(e) = a.poll_reset(cx) {
                        return Poll::Ready(Err((Direction::BToA, Op::Write, e)));
                    }
                }
                if watch_b {
                    if let Poll::Ready(e) = b.poll_reset(cx) {
                        return Poll::Ready(Err((Direction::AToB, Op::Write, e)));
                    }
                }
                // Registers the timer for the next tick.
                if let Some((sleep, _)) = &mut reset_watch {
                    let _ = sleep.as_mut().poll(cx);
                }
            }
        }
        if a_to_b.done && b_to_a.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    let stats = RelayStats {
        a_to_b: a_to_b.bytes,
        b_to_a: b_to_a.bytes,
    };
    match result {
        Ok(()) => {
            tracing::trace!(a_to_b = stats.a_to_b, b_to_a = stats.b_to_a, "relay done");
            Ok(stats)
        }
        Err((direction, op, error)) => {
            a.abort();
            b.abort();
            Err(match op {
                Op::Read => RelayError::Read {
                    direction,
                    error,
                    stats,
                },
                Op::Write | Op::Shutdown => RelayError::Write {
                    direction,
                    op,
                    error,
                    stats,
                },
            })
        }
    }
}

/// One direction: read from a source into a buffer, write it all to a sink, flush; at EOF shut
/// the sink down.
#[derive(Default)]
struct Half {
    /// Allocated when the first byte arrives; grows while reads fill it.
    buf: Vec<u8>,
    /// `buf[pos..end]` is read but not yet written.
    pos: usize,
    end: usize,
    /// From a source that hands out its own chunks (`Endpoint::poll_read_chunks`): taken, not yet
    /// written, `chunked` bytes in all. Such a source never uses `buf`.
    chunks: VecDeque<Bytes>,
    chunked: usize,
    /// The source said it has no chunks to hand out: use `buf`.
    copying: bool,
    read_eof: bool,
    need_flush: bool,
    /// The last fill used the whole buffer: grow it before the next one.
    full: bool,
    /// Size of the buffer given back while the sink had no room; the next fill takes one as big
    /// (or as big as the sink then takes).
    parked: usize,
    /// `before_shutdown` was called on the destination.
    shutting_down: bool,
    /// The sink took nothing at the last attempt (see [`Endpoint::sink_blocked`]).
    sink_blocked: bool,
    done: bool,
    bytes: u64,
}

impl Drop for Half {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.buf));
    }
}

impl Half {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
    ) -> Poll<Result<(), (Op, io::Error)>>
    where
        R: Endpoint + ?Sized,
        W: Endpoint + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        let mut moved = 0;
        loop {
            if moved >= FAIR_SHARE {
                // Back of the run queue: whatever else is ready goes first. That includes
                // connections whose sockets became ready only if the runtime looks at the
                // sockets between tasks (see `EVENT_INTERVAL`).
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.pending() == 0 && !self.read_eof {
                let room = match dst.poll_write_room(cx) {
                    None => MAX_BUF,
                    // Never 0: an empty read would look like EOF.
                    Some(Poll::Ready(Ok(room))) => room.max(1),
                    Some(Poll::Ready(Err(e))) => return Poll::Ready(Err((Op::Write, e))),
                    Some(Poll::Pending) => {
                        self.park();
                        self.note_blocked(src, true);
                        ready!(self.flush(cx, dst))?;
                        return Poll::Pending;
                    }
                };
                let filled = if self.copying {
                    self.fill(cx, src, room)
                } else {
                    self.fill_chunks(cx, src, room)
                };
                if let Err(e) = filled {
                    return Poll::Ready(Err((Op::Read, e)));
                }
                if self.pending() == 0 && !self.read_eof {
                    // Nothing to write: push out what the sink buffered, then wait for the source.
                    ready!(self.flush(cx, dst))?;
                    return Poll::Pending;
                }
            }
            while self.pending() > 0 {
                let written = if self.chunked > 0 {
                    let mut slices = [io::IoSlice::new(&[]); MAX_IOV];
                    let k = self.chunks.len().min(MAX_IOV);
                    for (slice, chunk) in slices.iter_mut().zip(&self.chunks) {
                        *slice = io::IoSlice::new(chunk);
                    }
                    Pin::new(&mut *dst).poll_write_vectored(cx, &slices[..k])
                } else {
                    Pin::new(&mut *dst).poll_write(cx, &self.buf[self.pos..self.end])
                };
                let Poll::Ready(written) = written else {
                    self.note_blocked(src, true);
                    return Poll::Pending;
                };
                self.note_blocked(src, false);
                let n = written.map_err(|e| (Op::Write, e))?;
                if n == 0 {
                    return Poll::Ready(Err((
                        Op::Write,
                        io::Error::new(io::ErrorKind::WriteZero, "sink accepted no bytes"),
                    )));
                }
                if self.chunked > 0 {
                    src.chunks_written(n);
                }
                self.consume(n);
                self.bytes += n as u64;
                moved += n;
                self.need_flush = true;
            }
            ready!(self.flush(cx, dst))?;
            if self.read_eof {
                if !self.shutting_down {
                    self.shutting_down = true;
                    dst.before_shutdown();
                }
                ready!(Pin::new(&mut *dst).poll_shutdown(cx)).map_err(|e| (Op::Shutdown, e))?;
                tracing::trace!(bytes = self.bytes, "half done");
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Push out what the sink buffered, if anything was written since the last flush.
    fn flush<W: Endpoint + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut W,
    ) -> Poll<Result<(), (Op, io::Error)>> {
        if self.need_flush {
            ready!(Pin::new(&mut *dst).poll_flush(cx)).map_err(|e| (Op::Write, e))?;
            self.need_flush = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Tells the source when its sink stops or starts taking bytes again (see
    /// [`Endpoint::sink_blocked`]), once per change.
    fn note_blocked<R: Endpoint + ?Sized>(&mut self, src: &R, blocked: bool) {
        if self.sink_blocked != blocked {
            self.sink_blocked = blocked;
            src.sink_blocked(blocked);
        }
    }

    /// The sink has no room and nothing is pending: hold no buffer while it stays so.
    fn park(&mut self) {
        if !self.buf.is_empty() {
            self.parked = self.capacity();
            give_back(std::mem::take(&mut self.buf));
        }
    }

    /// Bytes the buffer holds after [`SKEW`].
    fn capacity(&self) -> usize {
        self.buf.len().saturating_sub(SKEW)
    }

    /// Bytes read and not yet written.
    fn pending(&self) -> usize {
        self.end - self.pos + self.chunked
    }

    /// `n` bytes were written.
    fn consume(&mut self, mut n: usize) {
        if self.chunked == 0 {
            self.pos += n;
            return;
        }
        self.chunked -= n;
        while n > 0 {
            let front = self.chunks.front_mut().expect("written bytes were pending");
            if front.len() > n {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.chunks.pop_front();
        }
    }

    /// Takes the chunks the source has ready, up to [`MAX_BUF`] bytes, as `fill` reads into the
    /// buffer (called only when nothing is pending); switches to `fill` for good if the source
    /// has no chunks to give.
    fn fill_chunks<R: Endpoint + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        room: usize,
    ) -> io::Result<()> {
        match src.poll_read_chunks(cx, MAX_BUF.min(room), &mut self.chunks) {
            None => {
                self.copying = true;
                self.fill(cx, src, room)
            }
            Some(Poll::Pending) => Ok(()),
            Some(Poll::Ready(Err(e))) => Err(e),
            Some(Poll::Ready(Ok(0))) => {
                self.read_eof = true;
                Ok(())
            }
            Some(Poll::Ready(Ok(n))) => {
                self.chunked += n;
                Ok(())
            }
        }
    }

    /// Read whatever the source has ready, up to the buffer's size and `room` (what the sink
    /// takes now, at least 1). Leaves `pos == end` and `read_eof == false` when the source had
    /// nothing (its waker is then registered).
    fn fill<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        room: usize,
    ) -> io::Result<()> {
        self.pos = SKEW;
        self.end = SKEW;
        if self.parked > 0 {
            // As big as before, unless the sink now takes less (more streams share its budget).
            let len = std::mem::take(&mut self.parked).min(room.max(INITIAL_BUF));
            self.buf = buffer(SKEW + len);
        }
        // A buffer that never grew serves interactive traffic: once the source goes quiet it is
        // given back (below), so 10,000 idle connections hold no heap buffers and the probe read
        // allocates again when bytes arrive. A bulk transfer has grown its buffer and keeps it.
        let small = self.capacity() == INITIAL_BUF && !self.full;
        if self.buf.is_empty() {
            let mut probe = [0u8; PROBE_BUF];
            let mut rb = ReadBuf::new(&mut probe[..PROBE_BUF.min(room)]);
            match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    self.read_eof = true;
                    return Ok(());
                }
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    self.buf = vec![0; SKEW + INITIAL_BUF];
                    self.buf[SKEW..SKEW + n].copy_from_slice(rb.filled());
                    self.end = SKEW + n;
                }
            }
        } else if self.full && room > self.capacity() {
            // The previous batch filled the buffer: the source is fast, give it room, but no
            // more than the sink takes (a mux stream: its share of the carrier's send budget).
            let len = (self.capacity() * 4).min(MAX_BUF).min(room);
            self.buf = buffer(SKEW + len);
        }
        // Keep reading while the source has data ready so the sink gets large writes.
        let end = SKEW + self.capacity().min(room);
        while self.end < end {
            let mut rb = ReadBuf::new(&mut self.buf[self.end..end]);
            match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                Poll::Pending => break,
                // Bytes already read are dropped with the error: both sides are reset anyway, and
                // a TCP socket reports ECONNRESET only once, so the error must not be deferred.
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.read_eof = true;
                        break;
                    }
                    self.end += n;
                }
            }
        }
        self.full = self.end == self.buf.len();
        if small && self.end == SKEW && !self.read_eof {
            self.buf = Vec::new();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    const LIMIT: Duration = Duration::from_secs(60);

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// peer_a <-> [a  relay  b] <-> peer_b, all over loopback TCP.
    async fn relayed() -> (
        TcpStream,
        TcpStream,
        JoinHandle<Result<RelayStats, RelayError>>,
    ) {
        let (peer_a, a) = tcp_pair().await;
        let (b, peer_b) = tcp_pair().await;
        (peer_a, peer_b, tokio::spawn(relay(a, b)))
    }

    /// Deterministic pseudo-random bytes (xorshift), so a failure can be replayed.
    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn sha256(data: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, data)
            .as_ref()
            .to_vec()
    }

    /// Read until EOF or error; returns what was read and how it ended.
    async fn read_all<R: AsyncRead + Unpin>(r: &mut R) -> (Vec<u8>, io::Result<()>) {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return (out, Ok(())),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return (out, Err(e)),
            }
        }
    }

    async fn timed<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(LIMIT, f)
            .await
            .expect("test step did not finish in time")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_cross_both_ways_intact() {
        let (peer_a, peer_b, relay) = relayed().await;
        let up = pattern(5 * 1024 * 1024 + 17, 1);
        let down = pattern(3 * 1024 * 1024 + 5, 2);
        let (mut ar, mut aw) = peer_a.into_split();
        let (mut br, mut bw) = peer_b.into_split();
        let (up2, down2) = (up.clone(), down.clone());
        let wa = tokio::spawn(async move {
            aw.write_all(&up2).await.unwrap();
            aw.shutdown().await.unwrap();
            aw
        });
        let wb = tokio::spawn(async move {
            bw.write_all(&down2).await.unwrap();
            bw.shutdown().await.unwrap();
            bw
        });
        let ((got_up, end_b), (got_down, end_a)) =
            timed(async { tokio::join!(read_all(&mut br), read_all(&mut ar)) }).await;
        end_a.unwrap();
        end_b.unwrap();
        assert_eq!(sha256(&got_up), sha256(&up));
        assert_eq!(sha256(&got_down), sha256(&down));
        let stats = timed(relay).await.unwrap().unwrap();
        assert_eq!(
            stats,
            RelayStats {
                a_to_b: up.len() as u64,
                b_to_a: down.len() as u64
            }
        );
        drop((wa.await, wb.await));
    }

    /// As fast as memory: reads `left` bytes, always ready, then nothing more (not EOF), and
    /// takes every write at once, counting it.
    struct Unbounded {
        left: usize,
        taken: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl AsyncRead for Unbounded {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.left == 0 {
                return Poll::Pending;
            }
            let n = buf.remaining().min(self.left);
            buf.put_slice(&vec![7; n]);
            self.left -= n;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Unbounded {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.taken
                .fetch_add(buf.len(), std::sync::atomic::Ordering::Relaxed);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Endpoint for Unbounded {}

    struct CountWakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// forward runs every connection on one thread: a transfer whose source and sink are
    /// always ready must still hand the thread back after its share, asking to be polled
    /// again, or an interactive connection beside it waits until its socket buffers fill.
    #[test]
    fn a_transfer_that_never_blocks_yields_after_its_share() {
        use std::sync::atomic::Ordering::Relaxed;
        let total = 64 * 1024 * 1024;
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let source = Unbounded {
            left: total,
            taken: Arc::default(),
        };
        let sink = Unbounded {
            left: 0,
            taken: taken.clone(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let wakes = Arc::new(CountWakes(Default::default()));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut relay = Box::pin(relay(source, sink));
        let mut polls = 0;
        let mut before = 0;
        while taken.load(Relaxed) < total {
            let woken = wakes.0.load(Relaxed);
            assert!(relay.as_mut().poll(&mut cx).is_pending());
            polls += 1;
            let now = taken.load(Relaxed);
            // A share and the buffer that crossed it: a millisecond or so of work on one core.
            assert!(
                now - before <= 2 * MAX_BUF,
                "poll {polls} moved {} bytes",
                now - before
            );
            assert!(
                now == total || wakes.0.load(Relaxed) > woken,
                "poll {polls} stopped without asking to run again"
            );
            before = now;
        }
        assert!(polls >= total / (2 * MAX_BUF), "{polls} polls");
    }

    /// On forward's runtime a byte on another connection is seen within a share or so of a
    /// transfer that is always ready: with tokio's default `event_interval` it was 61 shares.
    #[test]
    fn a_byte_on_another_socket_is_seen_within_a_share_of_a_busy_transfer() {
        use std::io::Write;
        use std::sync::atomic::Ordering::Relaxed;
        use tokio::io::AsyncReadExt;
        const PINGS: usize = 5;
        let rt = tokio::runtime::Builder::new_current_thread()
            .event_interval(EVENT_INTERVAL)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (local, _) = listener.accept().unwrap();
        local.set_nonblocking(true).unwrap();
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // Another thread sends a byte now and then, noting what the transfer had moved once
        // the byte was in the socket (a late look only shortens the lag measured).
        let writer = {
            let taken = taken.clone();
            std::thread::spawn(move || {
                let mut sent_at = Vec::new();
                for _ in 0..PINGS {
                    std::thread::sleep(Duration::from_millis(20));
                    peer.write_all(b"x").unwrap();
                    sent_at.push(taken.load(Relaxed));
                }
                sent_at
            })
        };
        let seen_at = rt.block_on(async {
            let mut local = tokio::net::TcpStream::from_std(local).unwrap();
            let source = Unbounded {
                left: usize::MAX,
                taken: Arc::default(),
            };
            let sink = Unbounded {
                left: 0,
                taken: taken.clone(),
            };
            let transfer = tokio::spawn(relay(source, sink));
            let taken = taken.clone();
            let reader = tokio::spawn(async move {
                let mut seen_at = Vec::new();
                let mut b = [0u8; 1];
                for _ in 0..PINGS {
                    local.read_exact(&mut b).await.unwrap();
                    seen_at.push(taken.load(Relaxed));
                }
                seen_at
            });
            let seen_at = reader.await.unwrap();
            transfer.abort();
            seen_at
        });
        let sent_at = writer.join().unwrap();
        assert!(sent_at[0] > 0, "the transfer had not started");
        for (sent, seen) in sent_at.iter().zip(&seen_at) {
            let lag = seen.saturating_sub(*sent);
            assert!(
                lag <= 4 * MAX_BUF,
                "the byte was read {lag} bytes of transfer after it arrived (sent at {sent}, seen at {seen})"
            );
        }
    }

    /// A source that hands out its own chunks (as a mux stream does), of uneven sizes.
    struct Chunks(VecDeque<Bytes>);

    impl AsyncRead for Chunks {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            panic!("a chunked source is never read with poll_read")
        }
    }

    impl AsyncWrite for Chunks {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Endpoint for Chunks {
        /// At most three chunks a call, the last one cut at `max`.
        fn poll_read_chunks(
            &mut self,
            _cx: &mut Context<'_>,
            max: usize,
            out: &mut VecDeque<Bytes>,
        ) -> Option<Poll<io::Result<usize>>> {
            let mut n = 0;
            for _ in 0..3 {
                let chunk = match self.0.front_mut() {
                    None => break,
                    Some(front) if front.len() > max - n => front.split_to(max - n),
                    Some(_) => self.0.pop_front().unwrap(),
                };
                n += chunk.len();
                out.push_back(chunk);
                if n == max {
                    break;
                }
            }
            Some(Poll::Ready(Ok(n)))
        }
    }

    /// Chunks go out whole or in pieces (a sink that takes 777 bytes at a time) and arrive in
    /// order, every byte once; the other direction still reads with `poll_read`.
    #[tokio::test]
    async fn chunks_from_the_source_arrive_intact_through_partial_writes() {
        let data = pattern(3 * 1024 * 1024 + 11, 3);
        let mut chunks = VecDeque::new();
        let (mut at, mut size) = (0, 1);
        while at < data.len() {
            let n = size.min(data.len() - at);
            chunks.push_back(Bytes::copy_from_slice(&data[at..at + n]));
            at += n;
            size = size * 7 % 70_001 + 1;
        }
        let (near, mut far) = tokio::io::duplex(777);
        let relay = tokio::spawn(relay(Chunks(chunks), near));
        let (got, end) = timed(read_all(&mut far)).await;
        end.unwrap();
        far.shutdown().await.unwrap();
        assert_eq!(sha256(&got), sha256(&data));
        let stats = timed(relay).await.unwrap().unwrap();
        assert_eq!(stats.a_to_b, data.len() as u64);
    }

    /// A sink that knows its room, as a mux stream does (`poll_write_room`); panics when given
    /// more. It never has anything to read.
    #[derive(Clone, Default)]
    struct Narrow {
        room: Arc<std::sync::Mutex<(usize, Option<std::task::Waker>)>>,
        got: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Narrow {
        fn grant(&self, n: usize) {
            let mut r = self.room.lock().unwrap();
            r.0 += n;
            if let Some(w) = r.1.take() {
                w.wake();
            }
        }
        fn got(&self) -> usize {
            self.got.lock().unwrap().len()
        }
    }

    impl AsyncRead for Narrow {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Narrow {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut r = self.room.lock().unwrap();
            assert!(
                buf.len() <= r.0,
                "{} bytes offered with room for {}",
                buf.len(),
                r.0
            );
            r.0 -= buf.len();
            self.got.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Endpoint for Narrow {
        fn poll_write_room(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<usize>>> {
            let mut r = self.room.lock().unwrap();
            if r.0 == 0 {
                r.1 = Some(cx.waker().clone());
                return Some(Poll::Pending);
            }
            Some(Poll::Ready(Ok(r.0)))
        }
    }

    /// The relay reads from a socket no more than the sink has room for, so a sink that stops
    /// taking leaves the bytes in the socket, not in the relay; they all arrive, in order, as
    /// room returns in odd amounts.
    #[tokio::test]
    async fn a_sink_with_little_room_is_never_offered_more() {
        let data = pattern(300 * 1024 + 5, 9);
        let (mut peer, a) = tcp_pair().await;
        let sink = Narrow::default();
        sink.grant(1000);
        let relay = tokio::spawn(relay(a, sink.clone()));
        peer.write_all(&data).await.unwrap();
        timed(async {
            while sink.got() < 1000 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(sink.got(), 1000);
        timed(async {
            while sink.got() < data.len() {
                sink.grant(37_000);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert_eq!(sha256(&sink.got.lock().unwrap()), sha256(&data));
        relay.abort();
    }

    /// A TCP socket as a relay source that records what the relay says of its sink.
    struct Watched {
        inner: TcpStream,
        calls: Arc<std::sync::Mutex<Vec<bool>>>,
    }

    impl AsyncRead for Watched {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Watched {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    impl Endpoint for Watched {
        fn sink_blocked(&self, blocked: bool) {
            self.calls.lock().unwrap().push(blocked);
        }
    }

    /// A source hears once when its sink stops taking bytes (a reader that stopped reading:
    /// a QUIC stream counts such streams) and once when it takes them again; every byte still
    /// arrives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_source_hears_when_its_sink_stops_and_resumes() {
        let data = pattern(16 << 20, 5);
        let (mut peer_a, a) = tcp_pair().await;
        let (b, mut peer_b) = tcp_pair().await;
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let source = Watched {
            inner: a,
            calls: calls.clone(),
        };
        let relay = tokio::spawn(relay(source, b));
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            peer_a.write_all(&sent).await.unwrap();
            peer_a.shutdown().await.unwrap();
            peer_a
        });
        // peer_b reads nothing: 16 MiB do not fit in loopback socket buffers.
        timed(async {
            while calls.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            *calls.lock().unwrap(),
            [true],
            "one call while the sink stays full"
        );
        let (got, end) = timed(read_all(&mut peer_b)).await;
        end.unwrap();
        assert_eq!(sha256(&got), sha256(&data));
        let calls = calls.lock().unwrap().clone();
        assert!(
            calls.len() >= 2 && calls.last() == Some(&false),
            "calls {calls:?}"
        );
        assert!(
            calls.windows(2).all(|w| w[0] != w[1]),
            "one call per change: {calls:?}"
        );
        drop(timed(writer).await.unwrap());
        peer_b.shutdown().await.unwrap();
        timed(relay).await.unwrap().unwrap();
    }

    /// A relay whose side a sent "request" and half-closed, which b has read up to the EOF.
    async fn request_half_closed() -> (
        TcpStream,
        TcpStream,
        JoinHandle<Result<RelayStats, RelayError>>,
    ) {
        let (mut peer_a, mut peer_b, relay) = relayed().await;
        peer_a.write_all(b"request").await.unwrap();
        peer_a.shutdown().await.unwrap();
        let (got, end) = timed(read_all(&mut peer_b)).await;
        end.unwrap();
        assert_eq!(got, b"request");
        (peer_a, peer_b, relay)
    }

    #[tokio::test]
    async fn a_half_closes_and_b_answers_afterwards() {
        let (mut peer_a, mut peer_b, relay) = request_half_closed().await;
        // b's direction is still open after a's EOF.
        let answer = pattern(1024 * 1024, 3);
        peer_b.write_all(&answer).await.unwrap();
        peer_b.shutdown().await.unwrap();
        let (got, end) = timed(read_all(&mut peer_a)).await;
        end.unwrap();
        assert_eq!(sha256(&got), sha256(&answer));
        let stats = timed(relay).await.unwrap().unwrap();
        assert_eq!(stats.a_to_b, 7);
    }

    #[tokio::test]
    async fn b_half_closes_while_a_still_uploads() {
        let (mut peer_a, mut peer_b, relay) = relayed().await;
        peer_b.write_all(b"banner").await.unwrap();
        peer_b.shutdown().await.unwrap();
        let (got, end) = timed(read_all(&mut peer_a)).await;
        end.unwrap();
        assert_eq!(got, b"banner");
        let upload = pattern(2 * 1024 * 1024, 4);
        let (mut br, _bw) = peer_b.into_split();
        let reader = tokio::spawn(async move { read_all(&mut br).await });
        peer_a.write_all(&upload).await.unwrap();
        peer_a.shutdown().await.unwrap();
        let (got, end) = timed(reader).await.unwrap();
        end.unwrap();
        assert_eq!(sha256(&got), sha256(&upload));
        let stats = timed(relay).await.unwrap().unwrap();
        assert_eq!(stats.b_to_a, 6);
        assert_eq!(stats.a_to_b, upload.len() as u64);
    }

    #[tokio::test]
    async fn reset_on_one_side_resets_the_other() {
        let (mut peer_a, mut peer_b, relay) = relayed().await;
        peer_a.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        timed(peer_b.read_exact(&mut one)).await.unwrap();
        peer_b.abort();
        drop(peer_b);
        let (_, end) = timed(read_all(&mut peer_a)).await;
        assert_eq!(
            end.expect_err("peer a must see a reset, not EOF").kind(),
            io::ErrorKind::ConnectionReset
        );
        let err = timed(relay).await.unwrap().unwrap_err();
        assert_eq!(err.direction(), Direction::BToA);
        assert_eq!(err.io_error().kind(), io::ErrorKind::ConnectionReset);
        assert!(
            err.to_string().starts_with("b->a: read from b failed"),
            "{err}"
        );
        let text = err.describe("local", "edge");
        assert!(
            text.starts_with("edge -> local: reading from edge failed: "),
            "{text}"
        );
    }

    #[tokio::test]
    async fn reset_after_half_close_reaches_a_silent_other_side() {
        let (peer_a, mut peer_b, relay) = request_half_closed().await;
        // b never answers; a gives up abortively.
        peer_a.abort();
        drop(peer_a);
        let err = timed(relay).await.unwrap().unwrap_err();
        assert_eq!(err.direction(), Direction::BToA);
        assert_eq!(err.io_error().kind(), io::ErrorKind::ConnectionReset);
        assert!(err.to_string().contains("after its half-close"), "{err}");
        // b learns it too: its next read or write fails instead of waiting for an answer's reader.
        let mut one = [0u8; 1];
        let seen = timed(async {
            loop {
                match peer_b.write(b"late answer").await {
                    Err(e) => return e,
                    Ok(_) => match peer_b.read(&mut one).await {
                        Err(e) => return e,
                        Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                }
            }
        })
        .await;
        assert!(
            matches!(
                seen.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{seen}"
        );
    }

    /// A client that gives up on a service that stopped reading (its upload stuck, the relay
    /// blocked writing) is noticed: the relay ends with a reset instead of holding both
    /// connections for as long as the service stays stuck.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reset_of_an_uploader_stuck_behind_a_reader_that_stopped_is_noticed() {
        let (mut peer_a, peer_b, relay) = relayed().await;
        // peer_b never reads: fill every buffer on the way.
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), peer_a.write(&chunk)).await
        {
            sent += n;
        }
        assert!(sent > 0);
        peer_a.abort();
        drop(peer_a);
        let err = timed(relay).await.unwrap().unwrap_err();
        assert_eq!(
            err.io_error().kind(),
            io::ErrorKind::ConnectionReset,
            "{err}"
        );
        drop(peer_b);
    }

    #[tokio::test]
    async fn reset_of_the_receiver_stops_the_uploader_with_a_reset() {
        let (peer_a, peer_b, relay) = relayed().await;
        let (mut ar, mut aw) = peer_a.into_split();
        let uploader = tokio::spawn(async move {
            let chunk = pattern(64 * 1024, 8);
            // Writes until the reset arrives; never ends cleanly because nobody reads.
            loop {
                if let Err(e) = aw.write_all(&chunk).await {
                    return e;
                }
            }
        });
        let mut peer_b = peer_b;
        let mut first = [0u8; 1024];
        timed(peer_b.read_exact(&mut first)).await.unwrap();
        peer_b.abort();
        drop(peer_b);
        // Either half may notice first: the write to b or the read from b fails.
        let err = timed(relay).await.unwrap().unwrap_err();
        assert!(err.stats().a_to_b >= 1024, "{err}");
        let (_, end) = timed(read_all(&mut ar)).await;
        assert_eq!(
            end.expect_err("a reset, not EOF").kind(),
            io::ErrorKind::ConnectionReset
        );
        let write_err = timed(uploader).await.unwrap();
        assert!(
            matches!(
                write_err.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{write_err}"
        );
    }

    fn tls_configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["relay.test".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// client_tls <-> [server_tls(a)  relay  b] <-> peer_b
    async fn tls_relayed() -> (
        tokio_rustls::client::TlsStream<TcpStream>,
        TcpStream,
        JoinHandle<Result<RelayStats, RelayError>>,
    ) {
        let (server_cfg, client_cfg) = tls_configs();
        let (peer_a, a) = tcp_pair().await;
        let (b, peer_b) = tcp_pair().await;
        let name = rustls_pki_types::ServerName::try_from("relay.test").unwrap();
        let (client, server) = timed(async {
            tokio::join!(
                tokio_rustls::TlsConnector::from(client_cfg).connect(name, peer_a),
                tokio_rustls::TlsAcceptor::from(server_cfg).accept(a)
            )
        })
        .await;
        let (client, server) = (client.unwrap(), server.unwrap());
        (client, peer_b, tokio::spawn(relay(server, b)))
    }

    #[tokio::test]
    async fn tls_close_notify_is_a_half_close() {
        let (mut client, mut peer_b, relay) = tls_relayed().await;
        let up = pattern(1024 * 1024 + 3, 5);
        client.write_all(&up).await.unwrap();
        client.shutdown().await.unwrap();
        let (got, end) = timed(read_all(&mut peer_b)).await;
        end.unwrap();
        assert_eq!(sha256(&got), sha256(&up));
        let down = pattern(700 * 1024, 6);
        peer_b.write_all(&down).await.unwrap();
        peer_b.shutdown().await.unwrap();
        let (got, end) = timed(read_all(&mut client)).await;
        end.unwrap();
        assert_eq!(sha256(&got), sha256(&down));
        let stats = timed(relay).await.unwrap().unwrap();
        assert_eq!(stats.a_to_b, up.len() as u64);
        assert_eq!(stats.b_to_a, down.len() as u64);
    }

    #[tokio::test]
    async fn tls_eof_without_close_notify_resets_the_other_side() {
        let (mut client, mut peer_b, relay) = tls_relayed().await;
        client.write_all(b"partial").await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0u8; 7];
        timed(peer_b.read_exact(&mut got)).await.unwrap();
        // FIN on the TCP stream under TLS, with no close_notify: truncation.
        let (mut tcp, _) = client.into_inner();
        tcp.shutdown().await.unwrap();
        let (_, end) = timed(read_all(&mut peer_b)).await;
        assert_eq!(
            end.expect_err("peer b must see a reset, not EOF").kind(),
            io::ErrorKind::ConnectionReset
        );
        let err = timed(relay).await.unwrap().unwrap_err();
        assert!(err.is_truncation(), "{err}");
        assert_eq!(err.direction(), Direction::AToB);
        let text = err.describe("client", "vm");
        assert!(
            text.starts_with("client -> vm: client ended the stream without a clean close"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn joined_reader_and_writer_relay_like_a_socket() {
        let (peer_a, a) = tcp_pair().await;
        let (in_w, in_r) = tokio::io::duplex(1024);
        let (out_w, mut out_r) = tokio::io::duplex(1024);
        let relay = tokio::spawn(relay(a, Joined::new(in_r, out_w)));
        let (mut ar, mut aw) = peer_a.into_split();
        aw.write_all(b"to stdout").await.unwrap();
        aw.shutdown().await.unwrap();
        let (got, end) = timed(read_all(&mut out_r)).await;
        end.unwrap();
        assert_eq!(got, b"to stdout");
        let mut in_w = in_w;
        in_w.write_all(b"from stdin").await.unwrap();
        drop(in_w);
        let (got, end) = timed(read_all(&mut ar)).await;
        end.unwrap();
        assert_eq!(got, b"from stdin");
        timed(relay).await.unwrap().unwrap();
    }
}
