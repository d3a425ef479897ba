//! Frames of the mux carrier: the 12-byte header, the frame types and their payloads.
//!
//! ```text
//!  0        1        2                 4                                 8                                12
//! +--------+--------+-----------------+---------------------------------+---------------------------------+
//! |  type  | flags  | reserved (0)    |          stream id              |       payload length            |
//! +--------+--------+-----------------+---------------------------------+---------------------------------+
//! ```
//! All integers are big endian; `length` is always the payload length, so a reader can skip or reject a
//! frame from its header alone. Validation that needs only the header (type, flags, reserved bits, the
//! stream id rule and the length rule of each type) happens in [`Header::validate`], before any payload
//! byte is buffered.

use std::fmt;

use bytes::Bytes;

use crate::codes::{ErrorCode, ResetCode};

/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload a frame may carry; larger frames are rejected from the header alone.
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// Largest `AUTH` payload (the HMAC is 32 bytes; the rest leaves room for a key id).
pub const MAX_AUTH_PAYLOAD: u32 = 1024;
/// Largest `GOAWAY` reason text in bytes.
pub const MAX_GOAWAY_REASON: usize = 256;
/// Largest host name in an `OPEN` frame.
pub const MAX_HOST_LEN: usize = 255;
/// `DATA` flag: the sender will send nothing more on this stream (half-close).
pub const FLAG_FIN: u8 = 0x01;
/// `PING` flag: this is the answer to a ping.
pub const FLAG_ACK: u8 = 0x01;

/// A stream identifier. Clients open odd ids, strictly increasing; 0 means the connection.
pub type StreamId = u32;

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Client → server: authentication proof (opaque to this crate).
    Auth = 0x01,
    /// Server → client: authentication accepted.
    AuthOk = 0x02,
    /// Server → client: authentication rejected (one uniform reply).
    AuthFail = 0x03,
    /// Client → server: open a stream to a target.
    Open = 0x04,
    /// Server → client: the target was reached; data may flow back.
    OpenOk = 0x05,
    /// Stream bytes, flag FIN = half-close.
    Data = 0x06,
    /// Flow-control credit for a stream, or the connection (stream id 0).
    WindowUpdate = 0x07,
    /// Abort a stream with a [`ResetCode`].
    Rst = 0x08,
    /// Liveness and RTT probe, flag ACK for the answer.
    Ping = 0x09,
    /// End of the carrier: last processed stream id, [`ErrorCode`], reason text.
    GoAway = 0x0a,
}

impl FrameType {
    /// Decode a type byte.
    pub fn from_u8(v: u8) -> Option<FrameType> {
        Some(match v {
            0x01 => FrameType::Auth,
            0x02 => FrameType::AuthOk,
            0x03 => FrameType::AuthFail,
            0x04 => FrameType::Open,
            0x05 => FrameType::OpenOk,
            0x06 => FrameType::Data,
            0x07 => FrameType::WindowUpdate,
            0x08 => FrameType::Rst,
            0x09 => FrameType::Ping,
            0x0a => FrameType::GoAway,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            FrameType::Auth => "AUTH",
            FrameType::AuthOk => "AUTH_OK",
            FrameType::AuthFail => "AUTH_FAIL",
            FrameType::Open => "OPEN",
            FrameType::OpenOk => "OPEN_OK",
            FrameType::Data => "DATA",
            FrameType::WindowUpdate => "WINDOW_UPDATE",
            FrameType::Rst => "RST",
            FrameType::Ping => "PING",
            FrameType::GoAway => "GOAWAY",
        }
    }

    /// Flags this type may carry.
    fn allowed_flags(self) -> u8 {
        match self {
            FrameType::Data => FLAG_FIN,
            FrameType::Ping => FLAG_ACK,
            _ => 0,
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A malformed frame. Every variant maps to `GOAWAY(FRAME_SIZE_ERROR)` or `GOAWAY(PROTOCOL_ERROR)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The type byte is not a known frame type.
    #[error("unknown frame type 0x{0:02x} (is the peer speaking forward-mux/1?)")]
    UnknownType(u8),
    /// The payload length exceeds [`MAX_PAYLOAD`].
    #[error("{ty} frame of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge {
        /// Frame type.
        ty: FrameType,
        /// Announced payload length.
        len: u32,
    },
    /// The payload length is not allowed for this frame type.
    #[error("{ty} frame has a {len}-byte payload, expected {expected}")]
    BadLength {
        /// Frame type.
        ty: FrameType,
        /// Announced payload length.
        len: u32,
        /// What the type requires, in words.
        expected: &'static str,
    },
    /// Flag bits not defined for this type are set.
    #[error("{ty} frame has undefined flags 0x{flags:02x}")]
    BadFlags {
        /// Frame type.
        ty: FrameType,
        /// The flags byte.
        flags: u8,
    },
    /// The reserved field is not zero.
    #[error("{ty} frame has non-zero reserved bits 0x{reserved:04x}")]
    Reserved {
        /// Frame type.
        ty: FrameType,
        /// The reserved field.
        reserved: u16,
    },
    /// The stream id breaks the rule of this frame type (0 where a stream is required, or the reverse).
    #[error("{ty} frame on stream {id}: {expected}")]
    BadStreamId {
        /// Frame type.
        ty: FrameType,
        /// The stream id.
        id: StreamId,
        /// The rule, in words.
        expected: &'static str,
    },
    /// The `OPEN` payload is inconsistent or its host is not UTF-8.
    #[error("OPEN frame has a malformed target: {0}")]
    BadTarget(&'static str),
    /// The `GOAWAY` reason is not UTF-8.
    #[error("GOAWAY frame reason is not UTF-8")]
    BadReason,
}

impl FrameError {
    /// The `GOAWAY` code a receiver answers this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } | FrameError::BadLength { .. } => ErrorCode::FrameSizeError,
            _ => ErrorCode::ProtocolError,
        }
    }
}

/// The fixed 12-byte frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// Raw type byte (checked by [`Header::validate`]).
    pub ty: u8,
    /// Flag bits.
    pub flags: u8,
    /// Must be zero in v1.
    pub reserved: u16,
    /// Stream id, 0 for connection-level frames.
    pub stream_id: StreamId,
    /// Payload length in bytes.
    pub length: u32,
}

impl Header {
    /// Build a header for a known frame type.
    pub fn new(ty: FrameType, flags: u8, stream_id: StreamId, length: u32) -> Header {
        Header {
            ty: ty as u8,
            flags,
            reserved: 0,
            stream_id,
            length,
        }
    }

    /// Encode to the 12 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.ty;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.reserved.to_be_bytes());
        b[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        b[8..12].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode 12 wire bytes. Never fails: semantic checks live in [`Header::validate`], so a fuzzer or
    /// a diagnostic tool can still look at a bad header.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            ty: b[0],
            flags: b[1],
            reserved: u16::from_be_bytes([b[2], b[3]]),
            stream_id: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            length: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        }
    }

    /// Check everything that can be checked from the header alone; returns the frame type.
    pub fn validate(&self) -> Result<FrameType, FrameError> {
        let ty = FrameType::from_u8(self.ty).ok_or(FrameError::UnknownType(self.ty))?;
        if self.length > MAX_PAYLOAD {
            return Err(FrameError::TooLarge {
                ty,
                len: self.length,
            });
        }
        if self.flags & !ty.allowed_flags() != 0 {
            return Err(FrameError::BadFlags {
                ty,
                flags: self.flags,
            });
        }
        if self.reserved != 0 {
            return Err(FrameError::Reserved {
                ty,
                reserved: self.reserved,
            });
        }
        let needs_stream = matches!(
            ty,
            FrameType::Open | FrameType::OpenOk | FrameType::Data | FrameType::Rst
        );
        let needs_zero = matches!(
            ty,
            FrameType::Auth
                | FrameType::AuthOk
                | FrameType::AuthFail
                | FrameType::Ping
                | FrameType::GoAway
        );
        if needs_stream && self.stream_id == 0 {
            return Err(FrameError::BadStreamId {
                ty,
                id: 0,
                expected: "must name a stream (non-zero id)",
            });
        }
        if needs_zero && self.stream_id != 0 {
            return Err(FrameError::BadStreamId {
                ty,
                id: self.stream_id,
                expected: "must use stream id 0",
            });
        }
        let len = self.length;
        let bad = |expected| Err(FrameError::BadLength { ty, len, expected });
        match ty {
            FrameType::Auth if len == 0 || len > MAX_AUTH_PAYLOAD => bad("1 to 1024 bytes"),
            FrameType::AuthOk | FrameType::AuthFail | FrameType::OpenOk if len != 0 => {
                bad("0 bytes")
            }
            FrameType::Open if !(3..=3 + MAX_HOST_LEN as u32).contains(&len) => {
                bad("3 to 258 bytes")
            }
            FrameType::Data if len == 0 && self.flags & FLAG_FIN == 0 => {
                bad("at least 1 byte unless FIN is set")
            }
            FrameType::WindowUpdate | FrameType::Rst if len != 4 => bad("4 bytes"),
            FrameType::Ping if len != 8 => bad("8 bytes"),
            FrameType::GoAway if !(8..=8 + MAX_GOAWAY_REASON as u32).contains(&len) => {
                bad("8 to 264 bytes")
            }
            _ => Ok(ty),
        }
    }
}

/// Where a stream should connect, as carried by `OPEN`: `u16 port | u8 host_len | host`.
///
/// An empty host means "the agent's default target" (its loopback).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Host name or address literal; empty for the agent's default.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Target {
    /// A target; fails when the host is longer than [`MAX_HOST_LEN`] bytes.
    pub fn new(host: impl Into<String>, port: u16) -> Result<Target, FrameError> {
        let host = host.into();
        if host.len() > MAX_HOST_LEN {
            return Err(FrameError::BadTarget("host name longer than 255 bytes"));
        }
        Ok(Target { host, port })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.is_empty() {
            write!(f, "localhost:{}", self.port)
        } else if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One decoded frame. `DATA` and `AUTH` payloads are [`Bytes`] so they move into queues uncopied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Authentication proof.
    Auth(Bytes),
    /// Authentication accepted.
    AuthOk,
    /// Authentication rejected.
    AuthFail,
    /// Open stream `id` to `target`.
    Open {
        /// New stream id.
        id: StreamId,
        /// Where to connect.
        target: Target,
    },
    /// Stream `id` reached its target.
    OpenOk {
        /// Stream id.
        id: StreamId,
    },
    /// Stream bytes.
    Data {
        /// Stream id.
        id: StreamId,
        /// Last frame of this direction.
        fin: bool,
        /// The bytes.
        payload: Bytes,
    },
    /// Flow-control credit.
    WindowUpdate {
        /// Stream id, 0 for the connection.
        id: StreamId,
        /// Additional bytes the receiver accepts.
        increment: u32,
    },
    /// Stream abort.
    Rst {
        /// Stream id.
        id: StreamId,
        /// Why.
        code: ResetCode,
    },
    /// Liveness / RTT probe.
    Ping {
        /// This is an answer.
        ack: bool,
        /// Echoed unchanged.
        opaque: [u8; 8],
    },
    /// End of the carrier.
    GoAway {
        /// Highest stream id the sender processed.
        last_id: StreamId,
        /// Why.
        code: ErrorCode,
        /// Human-readable detail.
        reason: String,
    },
}

fn be32(p: &[u8]) -> u32 {
    u32::from_be_bytes([p[0], p[1], p[2], p[3]])
}

impl Frame {
    /// Build a frame from a validated header and its complete payload.
    ///
    /// `payload` must be exactly `header.length` bytes; `ty` is the result of [`Header::validate`].
    pub fn parse(ty: FrameType, header: &Header, payload: Bytes) -> Result<Frame, FrameError> {
        Frame::parse_with(ty, header, &payload.clone(), move || payload)
    }

    /// Like [`Frame::parse`] from a borrowed payload: only `DATA` and `AUTH` payloads are copied (once).
    pub fn parse_slice(
        ty: FrameType,
        header: &Header,
        payload: &[u8],
    ) -> Result<Frame, FrameError> {
        Frame::parse_with(ty, header, payload, || Bytes::copy_from_slice(payload))
    }

    fn parse_with(
        ty: FrameType,
        header: &Header,
        p: &[u8],
        owned: impl FnOnce() -> Bytes,
    ) -> Result<Frame, FrameError> {
        debug_assert_eq!(p.len(), header.length as usize);
        let id = header.stream_id;
        Ok(match ty {
            FrameType::Auth => Frame::Auth(owned()),
            FrameType::AuthOk => Frame::AuthOk,
            FrameType::AuthFail => Frame::AuthFail,
            FrameType::Open => {
                let port = u16::from_be_bytes([p[0], p[1]]);
                let host_len = p[2] as usize;
                if p.len() != 3 + host_len {
                    return Err(FrameError::BadTarget(
                        "host length does not match the frame length",
                    ));
                }
                let host = std::str::from_utf8(&p[3..])
                    .map_err(|_| FrameError::BadTarget("host is not UTF-8"))?;
                Frame::Open {
                    id,
                    target: Target {
                        host: host.to_owned(),
                        port,
                    },
                }
            }
            FrameType::OpenOk => Frame::OpenOk { id },
            FrameType::Data => Frame::Data {
                id,
                fin: header.flags & FLAG_FIN != 0,
                payload: owned(),
            },
            FrameType::WindowUpdate => Frame::WindowUpdate {
                id,
                increment: be32(p),
            },
            FrameType::Rst => Frame::Rst {
                id,
                code: ResetCode::from_u32(be32(p)),
            },
            FrameType::Ping => {
                let mut opaque = [0u8; 8];
                opaque.copy_from_slice(p);
                Frame::Ping {
                    ack: header.flags & FLAG_ACK != 0,
                    opaque,
                }
            }
            FrameType::GoAway => {
                let reason = std::str::from_utf8(&p[8..]).map_err(|_| FrameError::BadReason)?;
                Frame::GoAway {
                    last_id: be32(p),
                    code: ErrorCode::from_u32(be32(&p[4..])),
                    reason: reason.to_owned(),
                }
            }
        })
    }

    /// Append the wire form of this frame to `out`.
    ///
    /// Oversized `OPEN` hosts, `GOAWAY` reasons and payloads are truncated to the protocol limits
    /// rather than producing a frame the peer would reject; the session never builds such frames.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Auth(p) => put(
                out,
                FrameType::Auth,
                0,
                0,
                &[&p[..p.len().min(MAX_AUTH_PAYLOAD as usize)]],
            ),
            Frame::AuthOk => put(out, FrameType::AuthOk, 0, 0, &[]),
            Frame::AuthFail => put(out, FrameType::AuthFail, 0, 0, &[]),
            Frame::Open { id, target } => encode_open(out, *id, target),
            Frame::OpenOk { id } => put(out, FrameType::OpenOk, 0, *id, &[]),
            Frame::Data { id, fin, payload } => {
                let p = &payload[..payload.len().min(MAX_PAYLOAD as usize)];
                put(
                    out,
                    FrameType::Data,
                    if *fin { FLAG_FIN } else { 0 },
                    *id,
                    &[p],
                )
            }
            Frame::WindowUpdate { id, increment } => encode_window_update(out, *id, *increment),
            Frame::Rst { id, code } => encode_rst(out, *id, *code),
            Frame::Ping { ack, opaque } => encode_ping(out, *ack, *opaque),
            Frame::GoAway {
                last_id,
                code,
                reason,
            } => encode_goaway(out, *last_id, *code, reason),
        }
    }
}

fn put(out: &mut Vec<u8>, ty: FrameType, flags: u8, id: StreamId, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&Header::new(ty, flags, id, len as u32).encode());
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Append an `OPEN` frame (host truncated to [`MAX_HOST_LEN`] on a char boundary).
pub fn encode_open(out: &mut Vec<u8>, id: StreamId, target: &Target) {
    let host = &target.host[..target.host.floor_char_boundary_compat(MAX_HOST_LEN)];
    let port = target.port.to_be_bytes();
    put(
        out,
        FrameType::Open,
        0,
        id,
        &[&port, &[host.len() as u8], host.as_bytes()],
    );
}

/// Append an `OPEN_OK` frame.
pub fn encode_open_ok(out: &mut Vec<u8>, id: StreamId) {
    put(out, FrameType::OpenOk, 0, id, &[]);
}

/// Append a `DATA` frame header announcing `len` payload bytes; the caller appends the payload.
pub fn encode_data_header(out: &mut Vec<u8>, id: StreamId, fin: bool, len: u32) {
    out.extend_from_slice(&data_header(id, fin, len));
}

/// The header of a `DATA` frame with `len` payload bytes.
pub fn data_header(id: StreamId, fin: bool, len: u32) -> [u8; HEADER_LEN] {
    Header::new(FrameType::Data, if fin { FLAG_FIN } else { 0 }, id, len).encode()
}

/// Append a `WINDOW_UPDATE` frame.
pub fn encode_window_update(out: &mut Vec<u8>, id: StreamId, increment: u32) {
    put(
        out,
        FrameType::WindowUpdate,
        0,
        id,
        &[&increment.to_be_bytes()],
    );
}

/// Append an `RST` frame.
pub fn encode_rst(out: &mut Vec<u8>, id: StreamId, code: ResetCode) {
    put(out, FrameType::Rst, 0, id, &[&code.to_u32().to_be_bytes()]);
}

/// Append a `PING` frame.
pub fn encode_ping(out: &mut Vec<u8>, ack: bool, opaque: [u8; 8]) {
    put(
        out,
        FrameType::Ping,
        if ack { FLAG_ACK } else { 0 },
        0,
        &[&opaque],
    );
}

/// Append a `GOAWAY` frame (reason truncated to [`MAX_GOAWAY_REASON`] bytes on a char boundary).
pub fn encode_goaway(out: &mut Vec<u8>, last_id: StreamId, code: ErrorCode, reason: &str) {
    let reason = &reason[..reason.floor_char_boundary_compat(MAX_GOAWAY_REASON)];
    put(
        out,
        FrameType::GoAway,
        0,
        0,
        &[
            &last_id.to_be_bytes(),
            &code.to_u32().to_be_bytes(),
            reason.as_bytes(),
        ],
    );
}

/// `str::floor_char_boundary` is unstable; this is the same for our small limits.
trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, max: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, max: usize) -> usize {
        if max >= self.len() {
            return self.len();
        }
        let mut i = max;
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}
