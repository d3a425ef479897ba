//! What the session tells its driver.

use std::fmt;
use std::time::Duration;

use crate::codes::{ErrorCode, ResetCode};
use crate::frame::{StreamId, Target};

/// Something the driver must react to; drained with `Session::poll_event`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Server: the client's `AUTH` payload. Answer with `auth_accept` or `auth_reject` before acting
    /// on any event that follows it.
    AuthRequest(Vec<u8>),
    /// Client: the server accepted the `AUTH`.
    AuthOk,
    /// Client: the server rejected the `AUTH` (a `Closed` event follows).
    AuthFailed,
    /// Server: the client opened stream `id` to `target`; answer with `accept` or `reset`. If a later
    /// queued event already reset it, those calls return `StreamError::UnknownStream`: drop the dial.
    Opened {
        /// New stream.
        id: StreamId,
        /// Where the client wants to go.
        target: Target,
    },
    /// Client: the server reached the target of stream `id`.
    OpenOk(StreamId),
    /// Stream `id` has bytes (or its FIN) to read.
    Readable(StreamId),
    /// Stream `id` can accept more `write`s after one was cut short.
    Writable(StreamId),
    /// The peer half-closed stream `id`; `read` returns `Fin` once the buffered bytes are read.
    Finished(StreamId),
    /// The peer (or the carrier's end) aborted stream `id`; it is gone.
    Reset {
        /// The stream.
        id: StreamId,
        /// Why.
        code: ResetCode,
    },
    /// The peer sent `GOAWAY`: no new streams; with [`ErrorCode::NoError`] the open ones drain.
    GoAway {
        /// Highest stream id the peer processed; client streams above it were reset (retryable).
        last_id: StreamId,
        /// Why.
        code: ErrorCode,
        /// Peer's text.
        reason: String,
    },
    /// The session is over; every stream on it is dead (reset local sockets, never close them cleanly).
    Closed {
        /// Why.
        reason: CloseReason,
    },
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer broke the protocol; we sent `GOAWAY(code)`.
    ProtocolError {
        /// The code we sent.
        code: ErrorCode,
        /// What the peer did.
        detail: String,
    },
    /// The peer sent `GOAWAY` with an error code.
    PeerError {
        /// Its code.
        code: ErrorCode,
        /// Its text.
        reason: String,
    },
    /// Nothing received for the idle timeout: the carrier is dead.
    Timeout,
    /// A probe ([`crate::Session::probe`]) went unanswered: nothing received for `silent`, the
    /// last `waited` of it after a `PING`.
    Unanswered {
        /// How long nothing had arrived when the session gave up.
        silent: Duration,
        /// How long the probe waited.
        waited: Duration,
    },
    /// Server: the client did not authenticate in time.
    AuthTimeout,
    /// Authentication was rejected.
    AuthRejected,
    /// The local driver closed the session.
    Local {
        /// The code sent.
        code: ErrorCode,
    },
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::ProtocolError { code, detail } => {
                write!(f, "peer broke the protocol ({code}): {detail}")
            }
            CloseReason::PeerError { code, reason } if reason.is_empty() => {
                write!(f, "peer closed the carrier: {code}")
            }
            CloseReason::PeerError { code, reason } => {
                write!(f, "peer closed the carrier: {code}: {reason}")
            }
            CloseReason::Timeout => f.write_str(
                "carrier timed out: nothing received from the peer (is it still alive?)",
            ),
            CloseReason::Unanswered { silent, waited } => write!(
                f,
                "carrier timed out: nothing received from the peer for {:.1}s, no answer to a ping within {:.1}s (is it still alive?)",
                silent.as_secs_f64(),
                waited.as_secs_f64()
            ),
            CloseReason::AuthTimeout => f.write_str("client did not authenticate in time"),
            CloseReason::AuthRejected => {
                f.write_str("authentication rejected (check that both sides use the same token, and that the agent answers to the name dialled: its --name)")
            }
            // "closed locally: no error" read as a contradiction beside a drain's reset streams.
            CloseReason::Local {
                code: ErrorCode::NoError,
            } => f.write_str("closed locally"),
            CloseReason::Local { code } => write!(f, "closed locally: {code}"),
        }
    }
}

/// Result of `Session::read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many bytes were copied.
    Data(usize),
    /// The peer finished the stream and every byte has been read.
    Fin,
    /// Nothing buffered yet; a `Readable` event will follow.
    Blocked,
}

/// Result of `Session::read_chunk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    /// The next received bytes, uncopied.
    Data(bytes::Bytes),
    /// The peer finished the stream and every byte has been read.
    Fin,
    /// Nothing buffered yet; a `Readable` event will follow.
    Blocked,
}
