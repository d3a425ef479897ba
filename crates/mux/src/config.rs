//! Every number the session enforces, in one place so tests can shrink them.

use std::time::Duration;

/// Session parameters. [`Config::default`] is the production protocol (docs/protocol.md).
///
/// `stream_window` and `connection_window` are the *initial* credits each side assumes the other
/// grants; they are part of the protocol, so both ends of a carrier must use the same values.
#[derive(Debug, Clone)]
pub struct Config {
    /// Initial per-stream receive window, in bytes (256 KiB).
    pub stream_window: u32,
    /// Ceiling for per-stream window auto-tuning (16 MiB).
    pub max_stream_window: u32,
    /// Whether the per-stream receive window grows when the reader keeps up with a fast sender.
    pub auto_tune: bool,
    /// Connection-wide receive window, in bytes (64 MiB).
    pub connection_window: u32,
    /// Bytes a stream may hold in the session waiting for the carrier (send side), on top of which
    /// `write` accepts nothing (128 KiB).
    pub stream_send_buffer: usize,
    /// Bytes all streams together may hold waiting for the carrier (8 MiB): with many streams
    /// each gets `send_budget / streams`, but never less than `send_quantum`. Without it a peer
    /// that stops reading the carrier pins `stream_send_buffer` per stream (128 MiB at 1024).
    pub send_budget: usize,
    /// Largest `DATA` payload this side sends; also the per-stream round-robin quantum (16 KiB).
    pub send_quantum: usize,
    /// Live streams per carrier (1024).
    pub max_concurrent_streams: usize,
    /// Streams opened by the client but not yet accepted or refused by the server driver (256).
    pub max_pending_opens: usize,
    /// Server: streams the client may reset before they were answered (accepted or refused), per
    /// `budget_interval` (200). The rapid-reset class: each costs a dial for nothing.
    pub reset_budget: u32,
    /// Pings received allowed per `budget_interval` (100).
    pub ping_budget: u32,
    /// Window over which the budgets are counted (10 s).
    pub budget_interval: Duration,
    /// Send a PING after this long without receiving anything (15 s).
    pub keepalive_interval: Duration,
    /// While stream data arrives, send a PING this often to keep the minimum RTT that window
    /// auto-tuning compares against current (1 s; well inside the peer's `ping_budget`).
    pub rtt_probe_interval: Duration,
    /// Auto-tuning lets a stream window reach `delivery rate × (2 × minimum RTT + this)`: the
    /// queue it may always build, however short the path (4 ms).
    pub tune_queue_floor: Duration,
    /// The same for a stream with company (another stream carried data lately): its window
    /// reaches `rate × (1.5 × minimum RTT + this)` (250 µs). Smaller, because that queue is
    /// what the other stream's bytes wait behind.
    pub shared_queue_floor: Duration,
    /// Declare the carrier dead after this long without receiving anything (45 s).
    pub idle_timeout: Duration,
    /// Server: close a carrier that has not been authenticated after this long (10 s).
    pub auth_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            stream_window: 256 * 1024,
            max_stream_window: 16 * 1024 * 1024,
            auto_tune: true,
            connection_window: 64 * 1024 * 1024,
            stream_send_buffer: 128 * 1024,
            send_budget: 8 * 1024 * 1024,
            send_quantum: 16 * 1024,
            max_concurrent_streams: 1024,
            max_pending_opens: 256,
            reset_budget: 200,
            ping_budget: 100,
            budget_interval: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            rtt_probe_interval: Duration::from_secs(1),
            tune_queue_floor: Duration::from_millis(4),
            shared_queue_floor: Duration::from_micros(250),
            idle_timeout: Duration::from_secs(45),
            auth_timeout: Duration::from_secs(10),
        }
    }
}

/// Longest interval the session keeps (a year).
const MAX_INTERVAL: Duration = Duration::from_secs(365 * 24 * 3600);

impl Config {
    /// Clamp values that would break the protocol (zero or oversized windows, quantum above the frame
    /// limit, caps that would never let a stream open).
    pub(crate) fn sanitized(mut self) -> Config {
        // A peer treats credit above 2^31 - 1 as a flow-control error.
        const MAX: u32 = (1 << 31) - 1;
        self.stream_window = self.stream_window.clamp(1, MAX);
        self.max_stream_window = self.max_stream_window.clamp(self.stream_window, MAX);
        self.connection_window = self.connection_window.clamp(1, MAX);
        self.max_concurrent_streams = self.max_concurrent_streams.max(1);
        self.max_pending_opens = self.max_pending_opens.max(1);
        self.send_quantum = self
            .send_quantum
            .clamp(1, crate::frame::MAX_PAYLOAD as usize);
        self.stream_send_buffer = self.stream_send_buffer.max(1);
        self.send_budget = self.send_budget.max(1);
        // Deadlines are `now + interval`: an absurd interval would overflow the clock and panic.
        for d in [
            &mut self.budget_interval,
            &mut self.keepalive_interval,
            &mut self.rtt_probe_interval,
            &mut self.tune_queue_floor,
            &mut self.shared_queue_floor,
            &mut self.idle_timeout,
            &mut self.auth_timeout,
        ] {
            *d = (*d).min(MAX_INTERVAL);
        }
        self
    }
}
