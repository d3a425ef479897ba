//! The session: one carrier's state machine, for either role.
//!
//! ```text
//!  client:  Start ──send_auth──▶ AuthSent ──AUTH_OK──▶ Ready ──go_away / GOAWAY──▶ Draining ──▶ Closed
//!             │  (open/write allowed from Start: queued behind AUTH, zero round trips)
//!             └──────AUTH_FAIL / error / idle timeout──────────────────────────────────────▶ Closed
//!  server:  AwaitingAuth ──AUTH──▶ AuthPending ──auth_accept──▶ Ready ──▶ Draining ──▶ Closed
//!             │  any other first frame, auth timeout, auth_reject, error, idle timeout ─────▶ Closed
//! ```
//! Input is processed as it arrives, including frames that follow `AUTH` while the driver decides
//! (the client pipelines its OPENs); nothing leaves the server before `auth_accept`, and
//! `auth_reject` discards every event queued behind the `AuthRequest`.

mod input;
mod output;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::codes::{ErrorCode, ResetCode};
use crate::config::Config;
use crate::decoder::Decoder;
use crate::error::{SessionError, StreamError};
use crate::event::{CloseReason, Event, ReadChunk, ReadOutcome};
use crate::frame::{self, Frame, StreamId, Target};
use crate::stream::{RecvState, SendState, Stream};

/// A write at least this large is bulk: see [`Session::write`].
const BULK_WRITE: usize = 16 * 1024;
/// Where a bulk send buffer's first byte sits in its allocation. Over TLS, rustls copies each
/// record's plaintext to 5 bytes into a fresh allocation, page-aligned under mimalloc, so a
/// `DATA` payload lands 17 bytes (record and frame header) plus 12 per frame before it into
/// the record; from a page-aligned send buffer that put the first frames of every batch 17
/// and 29 bytes past their source modulo 4 KiB, where memcpy on AMD Zen with glibc runs at
/// 2 GB/s instead of ~40 (1 to 31 bytes; see docs/architecture.md). A quarter of the
/// client's record copies in an agent-tls upload were that slow. Half a page apart, no batch
/// of fewer than 170 frames comes near it.
const SEND_SKEW: usize = 2048;

/// A carrier silent this long is probed at once by [`Session::expect_answer`]: a busy one is
/// never this quiet, and an idle one pays one `PING` per new stream at most once a second.
pub const QUIET_PROBE: Duration = Duration::from_secs(1);

/// Which end of the carrier this session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opens streams (the `forward` client).
    Client,
    /// Accepts streams (the agent).
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// Client: `send_auth` not called yet. Server: no `AUTH` received yet.
    Start,
    /// Client: `AUTH` queued. Server: `AUTH` received, driver deciding.
    Pending,
    /// Authenticated.
    Done,
}

/// Counts events in fixed windows of `budget_interval`.
#[derive(Debug)]
struct Budget {
    start: Instant,
    count: u32,
}

impl Budget {
    /// Count one event; true when the limit is exceeded.
    fn hit(&mut self, now: Instant, interval: Duration, limit: u32) -> bool {
        if now.saturating_duration_since(self.start) >= interval {
            self.start = now;
            self.count = 0;
        }
        self.count += 1;
        self.count > limit
    }
}

/// One multiplexed carrier. See the crate docs for the driver loop.
#[derive(Debug)]
pub struct Session {
    role: Role,
    config: Config,
    auth: Auth,
    decoder: Decoder,
    streams: HashMap<StreamId, Stream>,
    /// Client: next id to open. Server: unused.
    next_id: u64,
    /// Server: highest stream id the client has opened.
    max_peer_id: StreamId,
    /// Server: streams not yet accepted or refused. Client: `OPEN`s sent and not yet answered.
    pending_opens: usize,
    /// Client: opens waiting for one of the `max_pending_opens` slots, oldest first.
    deferred_opens: VecDeque<(StreamId, Target)>,
    /// Client: streams reset locally before the server answered their `OPEN`, beyond
    /// `early_resets`. Their `RST` waits for the answer: before it, the server counts the reset
    /// against its rapid-reset budget (`Config::reset_budget`), and a load balancer's health
    /// checks that hang up at once (200 in 10 s) would have cut every other stream of the
    /// carrier. They keep their place among the pending opens until then, so the server's cap
    /// still holds.
    resets_due: HashMap<StreamId, ResetCode>,
    /// Client: unanswered streams reset at once, within a quarter of the server's budget: an
    /// early `RST` lets the agent give up a dial that is still waiting (a target that drops
    /// SYNs), so only a burst waits for answers.
    early_resets: Budget,
    /// Client: streams whose `OPEN` waits in `ctrl`, to date when it leaves (`mark_first_grant`;
    /// `now` may be stale when `open` is called).
    opens_unstamped: Vec<StreamId>,
    /// Encoded control frames, sent before any `DATA`.
    ctrl: Vec<u8>,
    ctrl_pos: usize,
    /// Where the outstanding ping ends in `ctrl`, to timestamp it when it leaves.
    ping_mark: Option<usize>,
    /// Round-robin queue of streams with something to send.
    ready: VecDeque<StreamId>,
    events: VecDeque<Event>,
    transmit_enabled: bool,
    conn_send_limit: u64,
    conn_sent: u64,
    /// Since when the peer has let us send less than a quarter of the connection window.
    send_credit_low_since: Option<Instant>,
    conn_recv_limit: u64,
    conn_received: u64,
    conn_consumed: u64,
    now: Instant,
    created: Instant,
    last_recv: Instant,
    last_ping: Instant,
    /// `conn_received` when the last PING was queued: RTT probes only while data arrives.
    received_at_ping: u64,
    /// The two streams that most recently carried data (either way), newest first: a bulk
    /// stream with company keeps a smaller window (see `output::window_cap`).
    recent: [Option<(StreamId, Instant)>; 2],
    /// Outstanding ping: opaque value and when it left (None until transmitted).
    ping_out: Option<(u64, Option<Instant>)>,
    /// A liveness probe (see [`Session::probe`]): when it started, and by when something must
    /// have arrived.
    probe: Option<(Instant, Instant)>,
    /// See [`Session::expect_answer`]: by when something must have arrived before a probe
    /// starts, and the probe's own wait.
    answer_due: Option<(Instant, Duration)>,
    ping_counter: u64,
    rtt: Option<Duration>,
    min_rtt: Option<Duration>,
    reset_budget: Budget,
    ping_budget: Budget,
    local_goaway: bool,
    peer_goaway: Option<StreamId>,
    closed: Option<CloseReason>,
}

impl Session {
    /// A session for `role`, created at `now` (the server's auth deadline counts from here).
    pub fn new(role: Role, config: Config, now: Instant) -> Session {
        let config = config.sanitized();
        let window = u64::from(config.connection_window);
        Session {
            role,
            auth: Auth::Start,
            decoder: Decoder::new(),
            streams: HashMap::new(),
            next_id: 1,
            max_peer_id: 0,
            pending_opens: 0,
            resets_due: HashMap::new(),
            early_resets: Budget {
                start: now,
                count: 0,
            },
            deferred_opens: VecDeque::new(),
            opens_unstamped: Vec::new(),
            ctrl: Vec::new(),
            ctrl_pos: 0,
            ping_mark: None,
            ready: VecDeque::new(),
            events: VecDeque::new(),
            transmit_enabled: false,
            conn_send_limit: window,
            conn_sent: 0,
            send_credit_low_since: None,
            conn_recv_limit: window,
            conn_received: 0,
            conn_consumed: 0,
            now,
            created: now,
            last_recv: now,
            last_ping: now,
            received_at_ping: 0,
            recent: [None, None],
            ping_out: None,
            probe: None,
            answer_due: None,
            ping_counter: 0,
            rtt: None,
            min_rtt: None,
            reset_budget: Budget {
                start: now,
                count: 0,
            },
            ping_budget: Budget {
                start: now,
                count: 0,
            },
            local_goaway: false,
            peer_goaway: None,
            closed: None,
            config,
        }
    }

    /// A client session.
    pub fn client(config: Config, now: Instant) -> Session {
        Session::new(Role::Client, config, now)
    }

    /// A server session.
    pub fn server(config: Config, now: Instant) -> Session {
        Session::new(Role::Server, config, now)
    }

    /// This session's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Smoothed round-trip time from PING/ACK, once one sample exists.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Number of live streams.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Bytes received that no driver has taken yet, on all streams: what holds the connection
    /// window (`Config::connection_window`). Readers that stopped reading leave theirs here;
    /// once it reaches the window, the peer can send nothing more on any stream.
    pub fn connection_held(&self) -> u64 {
        self.conn_received.saturating_sub(self.conn_consumed)
    }

    /// Since when the peer has let this side send less than a quarter of the connection window
    /// (`None` while it lets more). The sending side's view of [`Session::connection_held`]:
    /// the peer returns connection credit as its streams' bytes are taken, so while its readers
    /// take nothing the credit stays low, and a new stream here would get little of it. A
    /// healthy transfer dips below a quarter only with over 16 MiB in flight (the peer grants
    /// by half windows), so a driver treats a low credit that lasts as a full carrier.
    pub fn send_credit_low_since(&self) -> Option<Instant> {
        self.send_credit_low_since
    }

    /// Keeps [`Session::send_credit_low_since`] current; call when the credit changed.
    pub(super) fn note_send_credit(&mut self) {
        let low =
            self.conn_send_limit - self.conn_sent < u64::from(self.config.connection_window) / 4;
        match (low, self.send_credit_low_since) {
            (true, None) => self.send_credit_low_since = Some(self.now),
            (false, Some(_)) => self.send_credit_low_since = None,
            _ => {}
        }
    }

    /// Current receive window of a stream (grows with auto-tuning).
    pub fn stream_window(&self, id: StreamId) -> Option<u32> {
        self.streams.get(&id).map(|s| s.window)
    }

    /// Whether stream `id` is live and still waits for its answer (server: `accept`/`reset` not called
    /// yet; client: no `OPEN_OK` yet).
    pub fn is_pending(&self, id: StreamId) -> bool {
        self.streams.get(&id).is_some_and(|s| !s.accepted)
    }

    /// Bytes received on `id` and not yet read.
    pub fn stream_buffered(&self, id: StreamId) -> Option<usize> {
        self.streams.get(&id).map(|s| s.recv_buffered)
    }

    /// Heap bytes held by the session's streams and queues (an estimate: struct sizes, map slots,
    /// buffer capacities). For memory budgets and tests; O(streams).
    pub fn memory_estimate(&self) -> usize {
        let per_slot = std::mem::size_of::<(StreamId, Stream)>() + 1;
        let streams: usize = self
            .streams
            .values()
            .map(|s| {
                s.send_buf.capacity()
                    + s.recv_chunks.capacity() * std::mem::size_of::<bytes::Bytes>()
                    + s.recv_tail.capacity().saturating_sub(s.recv_tail.len())
                    + s.recv_buffered
            })
            .sum();
        self.streams.capacity() * per_slot
            + streams
            + self.ctrl.capacity()
            + self.ready.capacity() * std::mem::size_of::<StreamId>()
            + self.events.capacity() * std::mem::size_of::<Event>()
    }

    /// Whether streams still hold bytes or a `FIN` that has not gone into `poll_transmit`
    /// (waiting for credit, or for the writer), or control frames are queued. A carrier that
    /// closes before this is false loses them.
    pub fn has_unsent(&self) -> bool {
        self.ctrl_pos < self.ctrl.len()
            || !self.deferred_opens.is_empty()
            || self
                .streams
                .values()
                .any(|s| !s.send_buf.is_empty() || s.send == SendState::FinQueued)
    }

    /// How long nothing has arrived from the peer, as of `now`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_recv)
    }

    /// Asks the peer to show it is alive: a `PING` goes out (unless one is already waiting for
    /// its answer), and if nothing at all arrives within `within`, the session closes with
    /// [`CloseReason::Unanswered`]. Any byte received ends the probe. A probe already running
    /// keeps its deadline.
    ///
    /// The idle timeout alone declares a silent carrier dead only after a long wait (it must
    /// not kill a carrier that is merely quiet); a driver about to trust a carrier that has been
    /// silent for longer than a keepalive interval with new work can ask this sooner.
    pub fn probe(&mut self, now: Instant, within: Duration) {
        if self.closed.is_some() || self.probe.is_some() {
            return;
        }
        self.now = now;
        self.probe = Some((now, now + within));
        if self.ping_out.is_none() {
            self.queue_ping();
        }
    }

    /// Work was just trusted to the carrier (a stream opened with zero round trips), so the
    /// peer should answer soon (`OPEN_OK`, a refusal, data). If nothing at all arrives within
    /// `within`, a [`probe`](Session::probe) starts, with `within` again for its answer; a
    /// carrier already quiet for [`QUIET_PROBE`] is probed at once. A path that died an
    /// instant ago, with no keepalive missed yet, is so found in one or two `within` instead
    /// of the idle timeout (a connection made just after a path died waited 43 s).
    ///
    /// A slow answer costs no stream: a probe closes the carrier only if not even its `PING`
    /// is answered. At most one probe per [`QUIET_PROBE`] of silence, well within the peer's
    /// ping budget however many streams open.
    pub fn expect_answer(&mut self, now: Instant, within: Duration) {
        if self.closed.is_some() || self.probe.is_some() {
            return;
        }
        self.now = now;
        if self.silent_for(now) >= QUIET_PROBE {
            self.answer_due = None;
            self.probe(now, within);
        } else if self.answer_due.is_none() {
            self.answer_due = Some((now + within, within));
        }
    }

    /// Whether a probe waits for an answer.
    pub fn is_probing(&self) -> bool {
        self.probe.is_some()
    }

    /// Whether the session is authenticated (client: `AUTH_OK` received; server: `auth_accept` called).
    pub fn is_authenticated(&self) -> bool {
        self.auth == Auth::Done
    }

    /// Why the session closed, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    /// The session is over. Keep calling `poll_transmit` until it returns 0 to flush a final `GOAWAY`.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// A `GOAWAY` was sent or received and no stream is left, or the session is closed: the driver can
    /// flush `poll_transmit` and drop the carrier.
    pub fn is_drained(&self) -> bool {
        self.closed.is_some() || (self.is_going_away() && self.streams.is_empty())
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ----- authentication -------------------------------------------------------------------------

    /// Client: queue the `AUTH` frame. It goes out first, before any `OPEN` queued earlier, followed by
    /// a `PING` that gives the first RTT sample.
    pub fn send_auth(&mut self, payload: &[u8]) -> Result<(), SessionError> {
        if self.role != Role::Client {
            return Err(SessionError::Usage("send_auth is for client sessions"));
        }
        if self.auth != Auth::Start {
            return Err(SessionError::Usage("send_auth called twice"));
        }
        if payload.is_empty() || payload.len() > frame::MAX_AUTH_PAYLOAD as usize {
            return Err(SessionError::Usage("AUTH payload must be 1 to 1024 bytes"));
        }
        if self.closed.is_some() {
            return Err(SessionError::Closed);
        }
        self.auth = Auth::Pending;
        let mut ctrl = Vec::with_capacity(frame::HEADER_LEN + payload.len() + self.ctrl.len());
        Frame::Auth(bytes::Bytes::copy_from_slice(payload)).encode(&mut ctrl);
        ctrl.extend_from_slice(&self.ctrl[self.ctrl_pos..]);
        self.ctrl = ctrl;
        self.ctrl_pos = 0;
        self.transmit_enabled = true;
        self.queue_ping();
        Ok(())
    }

    /// Server: the `AUTH` payload was valid. Sends `AUTH_OK` (and a `PING` for the first RTT sample).
    pub fn auth_accept(&mut self) -> Result<(), SessionError> {
        self.check_auth_decision()?;
        self.auth = Auth::Done;
        let mut ctrl = Vec::with_capacity(frame::HEADER_LEN + self.ctrl.len());
        Frame::AuthOk.encode(&mut ctrl);
        ctrl.extend_from_slice(&self.ctrl);
        self.ctrl = ctrl;
        self.ctrl_pos = 0;
        self.transmit_enabled = true;
        self.queue_ping();
        Ok(())
    }

    /// Server: the `AUTH` payload was wrong. Sends the one uniform `AUTH_FAIL`, drops every event queued
    /// behind the request and closes.
    pub fn auth_reject(&mut self) -> Result<(), SessionError> {
        self.check_auth_decision()?;
        self.ctrl.clear();
        self.ctrl_pos = 0;
        Frame::AuthFail.encode(&mut self.ctrl);
        self.transmit_enabled = true;
        self.events.clear();
        self.close(CloseReason::AuthRejected, None);
        Ok(())
    }

    fn check_auth_decision(&self) -> Result<(), SessionError> {
        if self.role != Role::Server {
            return Err(SessionError::Usage(
                "auth_accept/auth_reject are for server sessions",
            ));
        }
        if self.closed.is_some() {
            return Err(SessionError::Closed);
        }
        match self.auth {
            Auth::Pending => Ok(()),
            Auth::Start => Err(SessionError::Usage("no AUTH frame has been received yet")),
            Auth::Done => Err(SessionError::Usage("authentication was already decided")),
        }
    }

    // ----- streams --------------------------------------------------------------------------------

    /// Client: open a stream to `target`. The `OPEN` is queued at once (behind `AUTH`), and `write` may
    /// follow immediately: no round trip is spent before data flows.
    ///
    /// At most `max_pending_opens` `OPEN`s are unanswered at a time (the server's cap); beyond that the
    /// `OPEN` and its data wait in the session until an earlier stream is answered, so a burst of
    /// connections is never refused for arriving together.
    pub fn open(&mut self, target: Target) -> Result<StreamId, StreamError> {
        if self.role != Role::Client {
            return Err(StreamError::Usage("only the client opens streams"));
        }
        if self.closed.is_some() {
            return Err(StreamError::SessionClosed);
        }
        if self.is_going_away() {
            return Err(StreamError::GoingAway);
        }
        if self.streams.len() >= self.config.max_concurrent_streams {
            return Err(StreamError::StreamLimit(self.config.max_concurrent_streams));
        }
        if self.next_id > u64::from(u32::MAX) {
            return Err(StreamError::IdsExhausted);
        }
        let id = self.next_id as StreamId;
        self.next_id += 2;
        let mut stream = Stream::new(self.config.stream_window, false);
        if self.pending_opens < self.config.max_pending_opens {
            self.pending_opens += 1;
            frame::encode_open(&mut self.ctrl, id, &target);
            self.opens_unstamped.push(id);
        } else {
            stream.open_sent = false;
            self.deferred_opens.push_back((id, target));
        }
        self.streams.insert(id, stream);
        if self.next_id > u64::from(u32::MAX) {
            // The last id: this carrier drains, and the driver opens the next stream on a new
            // one (it did not before, and every connection failed with `IdsExhausted` until
            // the carrier ended for another reason).
            self.go_away(ErrorCode::NoError, "stream ids used up");
        }
        Ok(id)
    }

    /// A `GOAWAY` was sent or received: no new streams here, existing ones go on.
    pub fn is_going_away(&self) -> bool {
        self.local_goaway || self.peer_goaway.is_some()
    }

    /// Server: the target of stream `id` is connected; sends `OPEN_OK`.
    ///
    /// Bytes the client sent with its `OPEN` (zero round trips) may already be buffered: a fresh
    /// `Event::Readable(id)` is queued for them, so a driver that ignored `Readable` while the stream
    /// was pending needs no special case.
    pub fn accept(&mut self, id: StreamId) -> Result<(), StreamError> {
        if self.role != Role::Server {
            return Err(StreamError::Usage("only the server accepts streams"));
        }
        if self.auth != Auth::Done {
            return Err(StreamError::Usage("accept called before auth_accept"));
        }
        let s = self.stream_mut(id)?;
        if s.accepted {
            return Err(StreamError::AlreadyAccepted(id));
        }
        s.accepted = true;
        let readable = s.recv_buffered > 0 || s.recv != RecvState::Open;
        if readable {
            s.readable_signalled = true;
        }
        self.pending_opens -= 1;
        frame::encode_open_ok(&mut self.ctrl, id);
        if readable {
            self.events.push_back(Event::Readable(id));
        }
        Ok(())
    }

    /// Each stream's send buffer now: `stream_send_buffer`, or its share of `send_budget` when
    /// many streams are open, never below one quantum (so all together hold at most
    /// `max(send_budget, send_quantum × streams)`).
    fn send_buffer(&self) -> usize {
        let c = &self.config;
        let share = c.send_budget / self.streams.len().max(1);
        share.clamp(
            c.send_quantum.min(c.stream_send_buffer),
            c.stream_send_buffer,
        )
    }

    /// How many bytes [`Session::write`] would take on stream `id` now. At 0 an
    /// `Event::Writable(id)` follows when room returns, as after a short write: a driver can
    /// read no more from its source than this, so a stream the peer does not drain holds
    /// nothing outside the session.
    pub fn send_room(&mut self, id: StreamId) -> Result<usize, StreamError> {
        let send_buffer = self.send_buffer();
        let s = self.sendable_mut(id)?;
        let room = s.send_capacity(send_buffer);
        if room == 0 {
            s.want_writable = true;
        }
        Ok(room)
    }

    /// Queue bytes on stream `id`. Accepts at most the peer's remaining credit and the free room of the
    /// stream's send buffer; returns how many bytes were taken. `Ok(0)` means "blocked": an
    /// `Event::Writable(id)` follows when room returns.
    pub fn write(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        let send_buffer = self.send_buffer();
        let s = self.sendable_mut(id)?;
        let n = s.send_capacity(send_buffer).min(data.len());
        if n < data.len() {
            s.want_writable = true;
        }
        if n == 0 {
            return Ok(0);
        }
        let (len, cap) = (s.send_buf.len(), s.send_buf.capacity());
        if n >= BULK_WRITE && cap - len < n {
            // A bulk writer fills the whole buffer over a few writes: one allocation of all of
            // it instead of a reallocation (and copy) per write. Small writes stay exact, so an
            // interactive stream holds little.
            let want = send_buffer.saturating_sub(len).max(n);
            if len == 0 {
                s.send_buf = skewed(want);
            } else {
                s.send_buf.reserve(want);
            }
        }
        s.send_buf.extend_from_slice(&data[..n]);
        s.send_accepted += n as u64;
        self.schedule(id);
        Ok(n)
    }

    /// Half-close stream `id`: a `FIN` follows the last queued byte. Reading continues.
    pub fn finish(&mut self, id: StreamId) -> Result<(), StreamError> {
        let s = self.sendable_mut(id)?;
        s.send = SendState::FinQueued;
        self.schedule(id);
        Ok(())
    }

    /// Copy received bytes of stream `id` into `buf`.
    ///
    /// Call this only when the bytes can be handed on (the local socket is writable): the credit for
    /// them is returned to the peer here, so a stream whose local reader stalls stops only itself.
    /// After the session closed, a stream whose peer had finished still reads to its end
    /// ([`Session::is_complete_after_close`]).
    pub fn read(&mut self, id: StreamId, buf: &mut [u8]) -> Result<ReadOutcome, StreamError> {
        let s = self.readable_mut(id)?;
        if s.recv_buffered == 0 || buf.is_empty() {
            return Ok(self.read_empty(id, buf.is_empty()));
        }
        let n = s.take_into(buf);
        self.release_credit(id, n);
        Ok(ReadOutcome::Data(n))
    }

    /// Like [`Session::read`] but hands out the next received chunk (at most `max` bytes) without
    /// copying it.
    pub fn read_chunk(&mut self, id: StreamId, max: usize) -> Result<ReadChunk, StreamError> {
        let chunk = self.take_chunk(id, max)?;
        if let ReadChunk::Data(data) = &chunk {
            self.release(id, data.len());
        }
        Ok(chunk)
    }

    /// Like [`Session::read_chunk`], but the stream's credit for the bytes stays with the caller
    /// until [`Session::release`] returns it: for a driver that takes chunks before its local
    /// socket accepts them. Bytes held so still count against the stream's window, so a stalled
    /// local reader holds at most its window, in the session or in the driver. The connection's
    /// credit goes back at once: the connection window bounds what the session buffers, and
    /// streams whose readers stall must not hold the whole carrier.
    pub fn take_chunk(&mut self, id: StreamId, max: usize) -> Result<ReadChunk, StreamError> {
        let s = self.readable_mut(id)?;
        if s.recv_buffered == 0 || max == 0 {
            return Ok(match self.read_empty(id, max == 0) {
                ReadOutcome::Fin => ReadChunk::Fin,
                ReadOutcome::Data(_) => ReadChunk::Data(bytes::Bytes::new()),
                ReadOutcome::Blocked => ReadChunk::Blocked,
            });
        }
        let chunk = s.take_chunk(max).expect("buffered bytes present");
        self.release_connection_credit(chunk.len());
        Ok(ReadChunk::Data(chunk))
    }

    /// Return the stream credit of `n` bytes taken with [`Session::take_chunk`] (they were
    /// written out). More than is held counts as what is held; on a stream already gone this
    /// does nothing.
    pub fn release(&mut self, id: StreamId, n: usize) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let n = (n as u64).min(s.recv_held());
        self.release_stream_credit(id, n as usize);
        self.relieve_starved();
    }

    fn read_empty(&mut self, id: StreamId, zero_buf: bool) -> ReadOutcome {
        let Some(s) = self.streams.get_mut(&id) else {
            return ReadOutcome::Blocked;
        };
        if s.recv_buffered > 0 && zero_buf {
            // Nothing asked for, nothing taken; the Readable signal stays outstanding.
            return ReadOutcome::Data(0);
        }
        match s.recv {
            RecvState::Open => {
                s.readable_signalled = false;
                ReadOutcome::Blocked
            }
            RecvState::FinReceived | RecvState::FinRead => {
                s.recv = RecvState::FinRead;
                self.remove_if_done(id);
                ReadOutcome::Fin
            }
        }
    }

    /// Abort stream `id` with `code`: buffered bytes are dropped both ways and `RST` is sent. A server
    /// refuses a pending stream this way (e.g. [`ResetCode::Refused`]).
    pub fn reset(&mut self, id: StreamId, code: ResetCode) -> Result<(), StreamError> {
        if self.closed.is_some() && self.streams.remove(&id).is_some() {
            // A finished stream kept readable after the close: nothing left to tell the peer.
            return Ok(());
        }
        let unanswered = {
            let s = self.stream_mut(id)?;
            s.open_sent && !s.accepted
        };
        let (interval, early) = (self.config.budget_interval, self.config.reset_budget / 4);
        if self.role == Role::Client
            && unanswered
            && self.early_resets.hit(self.now, interval, early)
        {
            let s = self.streams.remove(&id).expect("stream exists");
            if s.recv_buffered > 0 {
                self.release_connection_credit(s.recv_buffered);
            }
            self.resets_due.insert(id, code);
            return Ok(());
        }
        let stream = self.remove_stream(id).expect("stream exists");
        if stream.open_sent {
            // A deferred OPEN never left: the peer has nothing to forget.
            frame::encode_rst(&mut self.ctrl, id, code);
        }
        Ok(())
    }

    /// Start a graceful shutdown: send `GOAWAY(code, reason)` with the last stream processed, refuse new
    /// streams with the retryable [`ResetCode::GoingAway`], let open streams finish; see
    /// [`Session::is_drained`].
    pub fn go_away(&mut self, code: ErrorCode, reason: &str) {
        if self.closed.is_some() || self.local_goaway {
            return;
        }
        self.local_goaway = true;
        let last = self.last_processed();
        frame::encode_goaway(&mut self.ctrl, last, code, reason);
    }

    /// Close now: send `GOAWAY(code, reason)`, drop every stream. Use after a drain deadline or when the
    /// driver shuts down hard.
    pub fn close_now(&mut self, code: ErrorCode, reason: &str) {
        if self.closed.is_some() {
            return;
        }
        self.close(CloseReason::Local { code }, Some((code, reason.to_owned())));
    }

    fn last_processed(&self) -> StreamId {
        match self.role {
            Role::Server => self.max_peer_id,
            Role::Client => 0,
        }
    }

    /// Whether stream `id` outlived the session's close because its peer had sent all of it
    /// (FIN included): it reads to its end instead of failing.
    pub fn is_complete_after_close(&self, id: StreamId) -> bool {
        self.closed.is_some() && self.streams.contains_key(&id)
    }

    /// Like `stream_mut`, and after the close also the streams kept readable.
    fn readable_mut(&mut self, id: StreamId) -> Result<&mut Stream, StreamError> {
        if self.closed.is_some() && !self.streams.contains_key(&id) {
            return Err(StreamError::SessionClosed);
        }
        self.streams
            .get_mut(&id)
            .ok_or(StreamError::UnknownStream(id))
    }

    /// Stream `id`, if bytes may still be queued on it (not finished; accepted, on the server).
    fn sendable_mut(&mut self, id: StreamId) -> Result<&mut Stream, StreamError> {
        let role = self.role;
        let s = self.stream_mut(id)?;
        if s.send != SendState::Open {
            return Err(StreamError::Finished(id));
        }
        if role == Role::Server && !s.accepted {
            return Err(StreamError::NotAccepted(id));
        }
        Ok(s)
    }

    fn stream_mut(&mut self, id: StreamId) -> Result<&mut Stream, StreamError> {
        if self.closed.is_some() {
            return Err(StreamError::SessionClosed);
        }
        self.streams
            .get_mut(&id)
            .ok_or(StreamError::UnknownStream(id))
    }

    fn schedule(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get_mut(&id) {
            if !s.queued && s.has_transmit() {
                s.queued = true;
                self.ready.push_back(id);
            }
        }
    }

    fn remove_stream(&mut self, id: StreamId) -> Option<Stream> {
        let s = self.streams.remove(&id)?;
        if !s.open_sent {
            self.deferred_opens.retain(|(d, _)| *d != id);
        } else if !s.accepted {
            self.pending_opens -= 1;
            self.release_deferred_opens();
        }
        // Bytes the peer sent that nobody will read still count against the connection window:
        // return their credit so the carrier does not shrink.
        if s.recv_buffered > 0 {
            self.release_connection_credit(s.recv_buffered);
        }
        Some(s)
    }

    /// Client: send waiting `OPEN`s while fewer than `max_pending_opens` are unanswered. Ids stay
    /// strictly increasing on the wire because the queue is FIFO.
    pub(super) fn release_deferred_opens(&mut self) {
        while self.role == Role::Client
            && self.peer_goaway.is_none()
            && self.pending_opens < self.config.max_pending_opens
        {
            let Some((id, target)) = self.deferred_opens.pop_front() else {
                break;
            };
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.open_sent = true;
            self.opens_unstamped.push(id);
            self.pending_opens += 1;
            frame::encode_open(&mut self.ctrl, id, &target);
            self.schedule(id);
        }
    }

    /// Client: the server answered a stream reset before its answer (see `resets_due`); an
    /// `OPEN_OK` gets the `RST` now. Whether it was one.
    pub(super) fn answer_reset_due(&mut self, id: StreamId, accepted: bool) -> bool {
        let Some(code) = self.resets_due.remove(&id) else {
            return false;
        };
        self.pending_opens -= 1;
        if accepted {
            frame::encode_rst(&mut self.ctrl, id, code);
        }
        self.release_deferred_opens();
        true
    }

    fn remove_if_done(&mut self, id: StreamId) {
        if self.streams.get(&id).is_some_and(Stream::is_done) {
            self.remove_stream(id);
        }
    }

    /// End the session: optional `GOAWAY` for the peer, every stream dropped, `Closed` emitted once.
    fn close(&mut self, reason: CloseReason, goaway: Option<(ErrorCode, String)>) {
        if self.closed.is_some() {
            return;
        }
        // The driver's own words too: a client leaving reached the agent as "closed locally:
        // internal error" (the code a dead carrier's close uses), which read as a fault.
        let why = goaway.as_ref().map_or("", |(_, detail)| detail.as_str());
        tracing::debug!(role = ?self.role, %reason, why, streams = self.streams.len(), "mux session closed");
        if let Some((code, detail)) = goaway {
            if !self.transmit_enabled {
                // Nothing has left yet (server before auth, client before send_auth): say only this.
                self.ctrl.clear();
                self.ctrl_pos = 0;
                self.transmit_enabled = true;
            }
            let last = self.last_processed();
            frame::encode_goaway(&mut self.ctrl, last, code, &detail);
        }
        // A stream whose peer had sent everything, FIN included, lost nothing: its bytes stay
        // readable, so a drain that ends the carrier right after the last FIN (or a carrier
        // that breaks then) does not turn a complete transfer into a reset. Its send half ends
        // here: writing fails as on any closed session.
        self.streams
            .retain(|_, s| s.accepted && s.recv == RecvState::FinReceived);
        for s in self.streams.values_mut() {
            s.send = SendState::FinSent;
            s.send_buf = bytes::BytesMut::new();
        }
        self.ready.clear();
        self.deferred_opens.clear();
        self.resets_due.clear();
        self.pending_opens = 0;
        // Stream events would point at streams that no longer exist; keep only what explains the end.
        self.events
            .retain(|e| matches!(e, Event::GoAway { .. } | Event::AuthFailed));
        self.events.push_back(Event::Closed {
            reason: reason.clone(),
        });
        self.closed = Some(reason);
    }

    fn fail(&mut self, err: SessionError) -> SessionError {
        let code = err.code();
        let detail = match &err {
            SessionError::Protocol { detail, .. } => detail.clone(),
            other => other.to_string(),
        };
        self.close(
            CloseReason::ProtocolError {
                code,
                detail: detail.clone(),
            },
            Some((code, detail)),
        );
        err
    }
}

/// An empty buffer with room for `cap` bytes, [`SEND_SKEW`] bytes into its allocation.
fn skewed(cap: usize) -> bytes::BytesMut {
    let mut b = bytes::BytesMut::with_capacity(SEND_SKEW + cap);
    b.resize(SEND_SKEW, 0);
    bytes::Buf::advance(&mut b, SEND_SKEW);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that used its last stream id says GOAWAY and opens nothing more, so its driver
    /// moves on to a new carrier; the last stream itself works.
    #[test]
    fn the_last_stream_id_makes_the_session_go_away() {
        let now = Instant::now();
        let mut c = Session::client(Config::default(), now);
        c.send_auth(&[7; 32]).unwrap();
        let target = || Target::new("", 80).unwrap();
        c.next_id = u64::from(u32::MAX) - 2;
        assert_eq!(c.open(target()).unwrap(), u32::MAX - 2);
        assert!(!c.is_going_away());
        assert_eq!(c.open(target()).unwrap(), u32::MAX);
        assert!(c.is_going_away(), "the last id was used");
        assert_eq!(c.open(target()), Err(StreamError::GoingAway));
        assert_eq!(c.write(u32::MAX, b"still works").unwrap(), 11);
        let mut wire = Vec::new();
        while c.poll_transmit(now, &mut wire, 64 * 1024) > 0 {}
        let frames = crate::decoder::decode_all(&wire).unwrap();
        assert!(
            frames.iter().any(|f| matches!(
                f,
                Frame::GoAway {
                    code: ErrorCode::NoError,
                    ..
                }
            )),
            "no GOAWAY among {frames:?}"
        );
    }
}
