//! Per-stream state: send buffer and credit, receive queue and window.
//!
//! ```text
//!  send half:  Open ──finish()──▶ FinQueued ──last DATA(FIN) on the wire──▶ FinSent
//!  recv half:  Open ──DATA(FIN) received──▶ FinReceived ──read() returns Fin──▶ FinRead
//!  either half ──RST sent or received──▶ (stream removed)
//!  FinSent + FinRead ──▶ (stream removed)
//! ```
//! A server stream starts *pending* (`accepted == false`) until the driver calls `accept`; a client
//! stream is pending until `OPEN_OK` arrives. Buffers are allocated on first use and dropped when they
//! drain, so an idle stream costs a couple of hundred bytes.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

/// Send half state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendState {
    Open,
    FinQueued,
    FinSent,
}

/// Receive half state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecvState {
    Open,
    FinReceived,
    FinRead,
}

#[derive(Debug)]
pub(crate) struct Stream {
    /// Accepted by `write`, not yet on the wire.
    pub send_buf: BytesMut,
    /// Absolute stream offset the peer allows us to reach.
    pub send_limit: u64,
    /// Bytes accepted by `write` so far (sent + buffered).
    pub send_accepted: u64,
    pub send: SendState,
    /// Present in the round-robin queue.
    pub queued: bool,
    /// A `write` was cut short; emit `Writable` when room returns.
    pub want_writable: bool,

    pub recv_chunks: VecDeque<Bytes>,
    pub recv_buffered: usize,
    pub recv_received: u64,
    /// Absolute offset we allow the peer to reach.
    pub recv_limit: u64,
    pub recv_consumed: u64,
    /// Current receive window (auto-tuned).
    pub window: u32,
    /// When the last window update was sent, for auto-tuning.
    pub window_epoch: Option<Instant>,
    /// A window update is out: the limit it grants, and when it was sent. The last granted byte
    /// cannot arrive before one round trip has passed: a free RTT sample from bulk streams.
    pub rtt_mark: Option<(u64, Instant)>,
    /// Start of the current delivery-rate bin: when, and `recv_received` then.
    pub rate_bin: Option<(Instant, u64)>,
    /// Best recent delivery rate in bytes per second (decays by 1/8 per bin).
    pub max_rate: u64,
    pub recv: RecvState,
    /// A `Readable` event is outstanding (not yet followed by a read that drained the queue).
    pub readable_signalled: bool,
    /// Server: the driver accepted it. Client: `OPEN_OK` arrived.
    pub accepted: bool,
    /// Client: the `OPEN` is on its way (it waits while `max_pending_opens` are unanswered); no `DATA`
    /// may leave before it. Always true on the server.
    pub open_sent: bool,
}

impl Stream {
    pub fn new(window: u32, accepted: bool) -> Stream {
        Stream {
            send_buf: BytesMut::new(),
            send_limit: u64::from(window),
            send_accepted: 0,
            send: SendState::Open,
            queued: false,
            want_writable: false,
            recv_chunks: VecDeque::new(),
            recv_buffered: 0,
            recv_received: 0,
            recv_limit: u64::from(window),
            recv_consumed: 0,
            window,
            window_epoch: None,
            rtt_mark: None,
            rate_bin: None,
            max_rate: 0,
            recv: RecvState::Open,
            readable_signalled: false,
            accepted,
            open_sent: true,
        }
    }

    /// Counts the delivery rate in bins of at least `bin`, keeping the best recent one in
    /// `max_rate` (decaying by 1/8 per bin). Call before adding a frame to `recv_received`. A
    /// window-limited sender sends each credit as a burst, which crosses the bottleneck at the
    /// bottleneck's rate: bins shorter than an RTT see that rate, where bins of a whole RTT
    /// would see only window / RTT and never let the window past half the path's
    /// bandwidth-delay product.
    pub fn sample_rate(&mut self, now: Instant, bin: std::time::Duration) {
        match self.rate_bin {
            None => self.rate_bin = Some((now, self.recv_received)),
            Some((start, base)) => {
                let elapsed = now.saturating_duration_since(start);
                if elapsed >= bin {
                    let bytes = u128::from(self.recv_received - base);
                    let rate = (bytes * 1_000_000_000 / elapsed.as_nanos().max(1)) as u64;
                    self.max_rate = rate.max(self.max_rate - self.max_rate / 8);
                    self.rate_bin = Some((now, self.recv_received));
                }
            }
        }
    }

    /// Bytes `write` may accept now: bounded by peer credit and by our own send buffer.
    pub fn send_capacity(&self, send_buffer: usize) -> usize {
        let credit = self.send_limit.saturating_sub(self.send_accepted);
        let room = send_buffer.saturating_sub(self.send_buf.len()) as u64;
        credit.min(room) as usize
    }

    /// Whether the transmit scheduler has something to put on the wire for this stream.
    pub fn has_transmit(&self) -> bool {
        self.open_sent && (!self.send_buf.is_empty() || self.send == SendState::FinQueued)
    }

    /// Both halves are finished: the stream can be forgotten.
    pub fn is_done(&self) -> bool {
        self.send == SendState::FinSent && self.recv == RecvState::FinRead
    }

    /// Copy up to `buf.len()` received bytes out, dropping drained chunks.
    pub fn take_into(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            let Some(front) = self.recv_chunks.front_mut() else {
                break;
            };
            let k = front.len().min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&front[..k]);
            n += k;
            if k == front.len() {
                self.recv_chunks.pop_front();
            } else {
                let _ = front.split_to(k);
            }
        }
        self.after_take(n);
        n
    }

    /// Take the next received chunk (at most `max` bytes) without copying.
    pub fn take_chunk(&mut self, max: usize) -> Option<Bytes> {
        let front = self.recv_chunks.front_mut()?;
        let chunk = if front.len() <= max {
            self.recv_chunks.pop_front().expect("front exists")
        } else {
            front.split_to(max)
        };
        self.after_take(chunk.len());
        Some(chunk)
    }

    fn after_take(&mut self, n: usize) {
        self.recv_buffered -= n;
        self.recv_consumed += n as u64;
        if self.recv_buffered == 0 {
            self.readable_signalled = false;
            if self.recv_chunks.capacity() > 8 {
                self.recv_chunks = VecDeque::new();
            }
        }
    }
}
