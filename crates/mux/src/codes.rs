//! Numeric codes carried in `RST` (per stream) and `GOAWAY` (per connection) frames.
//!
//! Both enums keep unknown values (`Other`) instead of rejecting them, so a newer peer can add codes
//! without breaking an older one; the text of an unknown code still names the number.

use std::fmt;

/// Why a stream was reset (payload of an `RST` frame).
///
/// The agent uses these to tell the client why a target could not be reached, so the client can log
/// a precise reason next to the local connection it aborts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResetCode {
    /// The other side aborted the stream (its local socket failed or was reset).
    Cancel,
    /// The target actively refused the connection (nothing listens on that port).
    Refused,
    /// The target is outside what the agent allows (`--allow`).
    NotAllowed,
    /// The target did not answer within the agent's dial timeout.
    DialTimeout,
    /// The target host name did not resolve or no route to it exists.
    Unreachable,
    /// Too many concurrent or pending streams on this carrier; retry later or on another carrier.
    StreamLimit,
    /// The peer is shutting down (GOAWAY) and did not process this stream; safe to retry elsewhere.
    GoingAway,
    /// The whole carrier was lost before the stream finished.
    ConnectionLost,
    /// The peer hit an internal error while serving this stream.
    Internal,
    /// A code this version does not know.
    Other(u32),
}

impl ResetCode {
    /// The value on the wire.
    pub fn to_u32(self) -> u32 {
        match self {
            ResetCode::Cancel => 0,
            ResetCode::Refused => 1,
            ResetCode::NotAllowed => 2,
            ResetCode::DialTimeout => 3,
            ResetCode::Unreachable => 4,
            ResetCode::StreamLimit => 5,
            ResetCode::GoingAway => 6,
            ResetCode::ConnectionLost => 7,
            ResetCode::Internal => 8,
            ResetCode::Other(v) => v,
        }
    }

    /// Decode a wire value; unknown values are kept as [`ResetCode::Other`].
    pub fn from_u32(v: u32) -> ResetCode {
        match v {
            0 => ResetCode::Cancel,
            1 => ResetCode::Refused,
            2 => ResetCode::NotAllowed,
            3 => ResetCode::DialTimeout,
            4 => ResetCode::Unreachable,
            5 => ResetCode::StreamLimit,
            6 => ResetCode::GoingAway,
            7 => ResetCode::ConnectionLost,
            8 => ResetCode::Internal,
            v => ResetCode::Other(v),
        }
    }

    /// Whether the target was never contacted for this stream, so opening it again (later, or on a new
    /// carrier) cannot duplicate anything.
    pub fn is_retryable(self) -> bool {
        matches!(self, ResetCode::StreamLimit | ResetCode::GoingAway)
    }
}

impl fmt::Display for ResetCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetCode::Cancel => f.write_str("stream cancelled by the other side"),
            ResetCode::Refused => f.write_str(
                "target refused the connection (is the service listening on that port?)",
            ),
            ResetCode::NotAllowed => f.write_str(
                "target not allowed by the agent (widen it with `forward agent --allow`)",
            ),
            ResetCode::DialTimeout => f.write_str(
                "target did not answer within the agent's dial timeout (its --dial-timeout)",
            ),
            ResetCode::Unreachable => {
                f.write_str("target host unreachable or not resolvable from the agent")
            }
            ResetCode::StreamLimit => f.write_str("too many streams on this carrier (retryable)"),
            ResetCode::GoingAway => {
                f.write_str("agent is shutting down and did not process this stream (retryable)")
            }
            ResetCode::ConnectionLost => f.write_str("carrier connection lost"),
            ResetCode::Internal => f.write_str("internal error in the peer"),
            ResetCode::Other(v) => write!(f, "unknown reset code {v}"),
        }
    }
}

/// Why a whole carrier ends (payload of a `GOAWAY` frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Graceful shutdown: no new streams, existing ones drain.
    NoError,
    /// The peer broke a protocol rule (bad id, frame out of order, zero window increment, ...).
    ProtocolError,
    /// The peer sent more data than the window allowed, or overflowed a window.
    FlowControlError,
    /// A frame was too large, or its length is not allowed for its type (an unknown type,
    /// bad flags or a reserved field are `ProtocolError`).
    FrameSizeError,
    /// The peer exceeded a rate budget (resets, pings): rapid-reset style abuse.
    EnhanceYourCalm,
    /// The client did not authenticate in time.
    AuthTimeout,
    /// The sender hit an internal error.
    Internal,
    /// A code this version does not know.
    Other(u32),
}

impl ErrorCode {
    /// The value on the wire.
    pub fn to_u32(self) -> u32 {
        match self {
            ErrorCode::NoError => 0,
            ErrorCode::ProtocolError => 1,
            ErrorCode::FlowControlError => 2,
            ErrorCode::FrameSizeError => 3,
            ErrorCode::EnhanceYourCalm => 4,
            ErrorCode::AuthTimeout => 5,
            ErrorCode::Internal => 6,
            ErrorCode::Other(v) => v,
        }
    }

    /// Decode a wire value; unknown values are kept as [`ErrorCode::Other`].
    pub fn from_u32(v: u32) -> ErrorCode {
        match v {
            0 => ErrorCode::NoError,
            1 => ErrorCode::ProtocolError,
            2 => ErrorCode::FlowControlError,
            3 => ErrorCode::FrameSizeError,
            4 => ErrorCode::EnhanceYourCalm,
            5 => ErrorCode::AuthTimeout,
            6 => ErrorCode::Internal,
            v => ErrorCode::Other(v),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::NoError => f.write_str("no error"),
            ErrorCode::ProtocolError => f.write_str("protocol error"),
            ErrorCode::FlowControlError => f.write_str("flow control error"),
            ErrorCode::FrameSizeError => f.write_str("malformed frame"),
            ErrorCode::EnhanceYourCalm => f.write_str("too many resets or pings (rate limit)"),
            ErrorCode::AuthTimeout => f.write_str("authentication timed out"),
            ErrorCode::Internal => f.write_str("internal error"),
            ErrorCode::Other(v) => write!(f, "unknown error code {v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_including_unknown() {
        for v in 0..20 {
            assert_eq!(ResetCode::from_u32(v).to_u32(), v);
            assert_eq!(ErrorCode::from_u32(v).to_u32(), v);
        }
        assert_eq!(
            ResetCode::from_u32(0xdead).to_string(),
            "unknown reset code 57005"
        );
        assert!(ResetCode::GoingAway.is_retryable());
        assert!(!ResetCode::Refused.is_retryable());
    }
}
