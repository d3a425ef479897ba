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

    /// Received payloads in order; `recv_tail` holds the bytes after them.
    pub recv_chunks: VecDeque<Bytes>,
    /// Small payloads, appended: held one per chunk, 1-byte `DATA` frames cost 44 times their
    /// size in heap (an allocation and a queue slot each), so a peer within its window could
    /// make the other side hold gigabytes.
    pub recv_tail: BytesMut,
    pub recv_buffered: usize,
    pub recv_received: u64,
    /// Absolute offset we allow the peer to reach.
    pub recv_limit: u64,
    /// Bytes whose credit went back to the peer (read, or taken and released).
    pub recv_consumed: u64,
    /// Current receive window (auto-tuned).
    pub window: u32,
    /// When the last window update was sent, for auto-tuning.
    pub window_epoch: Option<Instant>,
    /// A window update is out: the limit it grants, and when it was sent. The last granted byte
    /// cannot arrive before one round trip has passed: a free RTT sample from bulk streams.
    pub rtt_mark: Option<(u64, Instant)>,
    /// Start of the current delivery-rate bin: when, and `recv_received` after the bytes of
    /// that first instant.
    pub rate_bin: Option<(Instant, u64)>,
    /// When the previous DATA frame arrived: a pause breaks the rate bin.
    pub last_arrival: Option<Instant>,
    /// The latest completed `rtt_mark` sample, until a window update judges it.
    pub grant_rtt: Option<std::time::Duration>,
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

/// Received payloads below this size are appended to the stream's tail buffer rather than
/// queued one by one: per chunk the queue slot and allocation cost under 5 % of 1 KiB.
const COALESCE_BELOW: usize = 1024;

/// Tail capacity an idle stream keeps for the next small payloads.
const COALESCE_KEEP: usize = 4096;

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
            recv_tail: BytesMut::new(),
            recv_buffered: 0,
            recv_received: 0,
            recv_limit: u64::from(window),
            recv_consumed: 0,
            window,
            window_epoch: None,
            rtt_mark: None,
            rate_bin: None,
            last_arrival: None,
            grant_rtt: None,
            max_rate: 0,
            recv: RecvState::Open,
            readable_signalled: false,
            accepted,
            open_sent: true,
        }
    }

    /// Counts the delivery rate in bins of at least `bin`, keeping the best recent one in
    /// `max_rate` (decaying by 1/8 per bin). Call with a DATA frame of `len` bytes before adding
    /// it to `recv_received`. A window-limited sender sends each credit as a burst, which crosses
    /// the bottleneck at the bottleneck's rate: bins shorter than an RTT see that rate, where bins
    /// of a whole RTT would see only window / RTT.
    ///
    /// Bytes that arrive *together* carry no rate: a proxy that buffers and forwards a whole
    /// burst at once, or a lost segment's recovery releasing a backlog, would read as a rate far
    /// above the path's (windows ran to 4-8 MiB at 1 % loss), and a bin spanning the pause after
    /// a burst reads as far below it (windows stuck at 256 KiB behind a buffering proxy). So a
    /// bin starts *after* its first instant's bytes, and a pause longer than `bin` discards it.
    pub fn sample_rate(&mut self, now: Instant, bin: std::time::Duration, len: usize) {
        let len = len as u64;
        let gap = self.last_arrival.map(|t| now.saturating_duration_since(t));
        self.last_arrival = Some(now);
        let after = self.recv_received + len;
        let paused = gap.is_some_and(|g| g > bin);
        match self.rate_bin {
            Some((start, base)) if !paused => {
                let elapsed = now.saturating_duration_since(start);
                if elapsed.is_zero() {
                    self.rate_bin = Some((start, after));
                } else if elapsed >= bin {
                    let bytes = u128::from(after - base);
                    let rate = (bytes * 1_000_000_000 / elapsed.as_nanos()) as u64;
                    self.max_rate = rate.max(self.max_rate - self.max_rate / 8);
                    self.rate_bin = Some((now, after));
                }
            }
            _ => self.rate_bin = Some((now, after)),
        }
    }

    /// The first window counts as a grant made `at`: for the opener when its `OPEN` leaves, for
    /// the acceptor one minimum RTT before the `OPEN` arrived (the opener sent its first window
    /// with it). Its last byte then dates a round trip like any update's (`rtt_mark`), and the
    /// first update may already judge growth (`window_epoch`): a download whose first window
    /// came back without queueing grows at once instead of a round trip later (at 100 ms and
    /// 1 Gbit/s each round trip of ramp is 12.5 MB not carried).
    pub fn mark_first_grant(&mut self, at: Instant) {
        self.rtt_mark = Some((self.recv_limit, at));
        self.window_epoch = Some(at);
    }

    /// Bytes the driver took with `Session::take_chunk` and whose credit it has not returned:
    /// received, no longer buffered, not yet consumed.
    pub fn recv_held(&self) -> u64 {
        self.recv_received - self.recv_buffered as u64 - self.recv_consumed
    }

    /// Accepted, still receiving, with nothing held anywhere (every byte received was
    /// written out) and stream credit left: connection credit is all it lacks to receive.
    pub fn is_starved(&self) -> bool {
        self.accepted
            && self.recv == RecvState::Open
            && self.recv_received == self.recv_consumed
            && self.recv_limit > self.recv_received
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

    /// Queue received bytes for the reader: a small payload joins the tail, anything else
    /// ends it and is queued as it came (no copy).
    pub fn push_received(&mut self, payload: Bytes) {
        self.recv_buffered += payload.len();
        if payload.len() < COALESCE_BELOW {
            self.recv_tail.extend_from_slice(&payload);
            return;
        }
        self.seal_tail();
        self.recv_chunks.push_back(payload);
    }

    /// Moves the coalesced tail into the chunk queue, so it is read in order.
    fn seal_tail(&mut self) {
        if !self.recv_tail.is_empty() {
            let tail = self.recv_tail.split().freeze();
            self.recv_chunks.push_back(tail);
        }
    }

    /// The next received bytes, if any.
    fn front_mut(&mut self) -> Option<&mut Bytes> {
        if self.recv_chunks.is_empty() {
            self.seal_tail();
        }
        self.recv_chunks.front_mut()
    }

    /// Copy up to `buf.len()` received bytes out, dropping drained chunks.
    pub fn take_into(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            let Some(front) = self.front_mut() else {
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
        let front = self.front_mut()?;
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
        if self.recv_buffered == 0 {
            self.readable_signalled = false;
            if self.recv_chunks.capacity() > 8 {
                self.recv_chunks = VecDeque::new();
            }
            if self.recv_tail.capacity() > COALESCE_KEEP {
                self.recv_tail = BytesMut::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const BIN: Duration = Duration::from_micros(12_500);
    const RTT: Duration = Duration::from_millis(110);
    /// 12.5 MB/s (100 Mbit/s) in 16 KiB frames: one every 1.31 ms.
    const FRAME: usize = 16 * 1024;
    const GAP: Duration = Duration::from_nanos(1_310_720);

    fn arrive(s: &mut Stream, at: Instant, len: usize) {
        s.sample_rate(at, BIN, len);
        s.recv_received += len as u64;
    }

    #[test]
    fn a_steady_flow_with_late_reads_shows_its_rate() {
        // Every 7th read comes 4 ms late and brings the backlog at once, as a busy reader does.
        let mut s = Stream::new(1 << 20, true);
        let t0 = Instant::now();
        let mut backlog = 0;
        for i in 0..2000u32 {
            let due = t0 + GAP * i;
            if i % 7 < 3 {
                backlog += FRAME;
                continue;
            }
            arrive(&mut s, due, backlog + FRAME);
            backlog = 0;
        }
        let rate = s.max_rate as f64 / 12.5e6;
        assert!(
            (0.9..1.2).contains(&rate),
            "rate {:.2} x the true one",
            rate
        );
    }

    #[test]
    fn bursts_that_arrive_in_one_piece_show_no_rate() {
        // A window-limited stream behind a buffering proxy: 256 KiB at once, once per round trip.
        let mut s = Stream::new(1 << 20, true);
        let t0 = Instant::now();
        for k in 0..20u32 {
            for _ in 0..16 {
                arrive(&mut s, t0 + RTT * k, FRAME);
            }
        }
        assert_eq!(s.max_rate, 0, "a burst in one instant has no rate");
    }
}
