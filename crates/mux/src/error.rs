//! Error types of the session and stream APIs.

use crate::codes::ErrorCode;
use crate::frame::{FrameError, StreamId};

/// Why `handle_input` refused the carrier bytes. The session is closed after any of these (a
/// `GOAWAY` with [`SessionError::code`] is queued for the peer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// A frame could not be decoded.
    #[error("malformed frame from peer: {0}")]
    Frame(#[from] FrameError),
    /// A well-formed frame broke a protocol rule.
    #[error("peer broke the protocol ({code}): {detail}")]
    Protocol {
        /// The code sent in `GOAWAY`.
        code: ErrorCode,
        /// What exactly was wrong.
        detail: String,
    },
    /// The session was already closed; the bytes were ignored.
    #[error("the carrier session is already closed")]
    Closed,
    /// An API call that makes no sense in the session's role or phase.
    #[error("invalid call: {0}")]
    Usage(&'static str),
}

impl SessionError {
    /// The `GOAWAY` code that describes this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Frame(e) => e.code(),
            SessionError::Protocol { code, .. } => *code,
            SessionError::Closed | SessionError::Usage(_) => ErrorCode::Internal,
        }
    }

    pub(crate) fn protocol(detail: impl Into<String>) -> SessionError {
        SessionError::Protocol {
            code: ErrorCode::ProtocolError,
            detail: detail.into(),
        }
    }

    pub(crate) fn flow(detail: impl Into<String>) -> SessionError {
        SessionError::Protocol {
            code: ErrorCode::FlowControlError,
            detail: detail.into(),
        }
    }
}

/// Why a stream operation was refused. None of these close the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// No such live stream.
    #[error("stream {0} is not open (never opened, already closed, or reset)")]
    UnknownStream(StreamId),
    /// `write` or `finish` after `finish`.
    #[error("stream {0} was already finished; nothing more can be written to it")]
    Finished(StreamId),
    /// The server driver must `accept` before writing.
    #[error("stream {0} has not been accepted yet; call accept before writing")]
    NotAccepted(StreamId),
    /// `accept` on a stream that was already accepted.
    #[error("stream {0} was already accepted")]
    AlreadyAccepted(StreamId),
    /// The carrier is closed; every stream on it is gone.
    #[error("the carrier session is closed")]
    SessionClosed,
    /// The carrier is shutting down; open the stream on a new carrier.
    #[error("the carrier is going away; open the stream on a new carrier")]
    GoingAway,
    /// Too many live streams on this carrier.
    #[error("the carrier already has {0} streams, its limit; wait for one to close or use another carrier")]
    StreamLimit(usize),
    /// All client stream ids were used.
    #[error("stream ids are exhausted on this carrier; open a new carrier")]
    IdsExhausted,
    /// The call does not exist for this role or phase.
    #[error("invalid call: {0}")]
    Usage(&'static str),
}
