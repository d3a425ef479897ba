//! Sans-IO stream multiplexer for `forward`'s agent carrier (`forward-mux/1`).
//!
//! One authenticated carrier (TLS or TCP byte stream) carries many TCP connections as *streams*. This
//! crate is the protocol alone: the frame codec, the per-carrier [`Session`] state machine, per-stream
//! and per-connection flow control with auto-tuning, keepalive, limits and graceful shutdown. It owns
//! no socket, spawns nothing and never reads the clock: time is an argument.
//!
//! ```text
//!   carrier bytes ──handle_input(now, &[u8])──▶ ┌──────────┐ ──poll_event()──▶ Event (Opened, Readable,…)
//!                                               │ Session  │
//!   local socket ──write(id, &[u8]) / finish──▶ │ streams, │ ──read(id, buf)──▶ local socket
//!                                               │ windows  │     (returns credit to the peer)
//!   carrier ◀──poll_transmit(now, &mut Vec, max)┤ timers   │ ◀──handle_timeout(now) at poll_timeout()
//!                                               └──────────┘
//! ```
//!
//! A driver loop (the tokio side lives in `forward-tunnel`):
//! 1. carrier readable → [`Session::handle_input`]; then drain [`Session::poll_event`];
//! 2. local socket readable → [`Session::write`] (on `Ok(0)` wait for `Event::Writable`);
//! 3. `Event::Readable(id)` and the local socket writable → [`Session::read`] → write it out;
//! 4. after any of these → [`Session::poll_transmit`] into a 64–256 KiB buffer → carrier (or
//!    [`Session::poll_transmit_chunks`] into a [`Transmit`], whose payloads are the streams' own
//!    buffers, for one vectored write without copying them);
//! 5. sleep until [`Session::poll_timeout`] → [`Session::handle_timeout`].
//!
//! ```
//! use std::time::Instant;
//! use forward_mux::{Config, Event, ReadOutcome, Session, Target};
//!
//! let now = Instant::now();
//! let mut client = Session::client(Config::default(), now);
//! let mut server = Session::server(Config::default(), now);
//!
//! // Zero round trips: open and write before authentication has even been answered.
//! let id = client.open(Target::new("", 5432).unwrap()).unwrap();
//! client.write(id, b"hello").unwrap();
//! client.finish(id).unwrap();
//! client.send_auth(b"hmac-from-the-driver").unwrap();
//!
//! let mut carrier = Vec::new();
//! while client.poll_transmit(now, &mut carrier, 64 * 1024) > 0 {}
//! server.handle_input(now, &carrier).unwrap();
//! let (mut buf, mut got, mut finished) = ([0u8; 16], Vec::new(), false);
//! while let Some(event) = server.poll_event() {
//!     match event {
//!         Event::AuthRequest(proof) => {
//!             assert_eq!(proof, b"hmac-from-the-driver");
//!             server.auth_accept().unwrap();
//!         }
//!         Event::Opened { id, target } => {
//!             assert_eq!(target.port, 5432);
//!             server.accept(id).unwrap(); // after dialing the target
//!         }
//!         // Bytes that came with the OPEN are announced again by `accept`; a spurious
//!         // `Readable` just reads `Blocked` (or `Fin` again).
//!         Event::Readable(id) if !server.is_pending(id) => loop {
//!             match server.read(id, &mut buf).unwrap() {
//!                 ReadOutcome::Data(n) => got.extend_from_slice(&buf[..n]),
//!                 ReadOutcome::Fin => { finished = true; break }
//!                 ReadOutcome::Blocked => break,
//!             }
//!         },
//!         _ => {}
//!     }
//! }
//! assert_eq!(got, b"hello");
//! assert!(finished);
//! ```
//!
//! Left to others: the HTTP upgrade and the HMAC of `AUTH` (the payload is opaque here; the server
//! driver answers `Event::AuthRequest` with [`Session::auth_accept`] or [`Session::auth_reject`]), TLS,
//! dialing targets, the `--allow` policy, reconnecting, and mapping a `Reset`/`Closed` to an abortive
//! close of the local socket. The wire format is documented in `docs/protocol.md`.

#![warn(missing_docs)]

pub mod codes;
mod config;
pub mod decoder;
mod error;
mod event;
pub mod frame;
mod session;
mod stream;
mod transmit;

#[doc(hidden)]
pub mod fuzzing;

pub use codes::{ErrorCode, ResetCode};
pub use config::Config;
pub use decoder::Decoder;
pub use error::{SessionError, StreamError};
pub use event::{CloseReason, Event, ReadChunk, ReadOutcome};
pub use frame::{Frame, FrameError, FrameType, Header, StreamId, Target};
pub use session::{Role, Session};
pub use transmit::Transmit;

#[cfg(test)]
mod codec_tests;
