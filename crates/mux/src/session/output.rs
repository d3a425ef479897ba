//! Carrier bytes out (control frames first, then fair round-robin `DATA`), credit returns and timers.

use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::{Auth, Role, Session};
use crate::codes::ErrorCode;
use crate::event::{CloseReason, Event};
use crate::frame::{self, StreamId, HEADER_LEN};
use crate::stream::{RecvState, SendState};
use crate::transmit::{Sink, Transmit};

impl Session {
    /// Append bytes for the carrier to `out`, at most `max` of them; returns how many were appended.
    ///
    /// Control frames go first. Then streams with queued data take turns, one `DATA` frame of at most
    /// `send_quantum` bytes per turn, so a bulk stream cannot starve an interactive one. Call until it
    /// returns 0 after every input, API call or timeout; `max` of 64 KiB or more keeps syscalls large.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>, max: usize) -> usize {
        self.transmit_into(now, out, max)
    }

    /// [`Session::poll_transmit`] into a [`Transmit`]: the same bytes, but stream payloads are
    /// handed over by reference instead of copied, for one vectored write.
    pub fn poll_transmit_chunks(&mut self, now: Instant, out: &mut Transmit, max: usize) -> usize {
        self.transmit_into(now, out, max)
    }

    fn transmit_into(&mut self, now: Instant, out: &mut impl Sink, max: usize) -> usize {
        self.now = now;
        if !self.transmit_enabled {
            return 0;
        }
        let start = out.len();
        let limit = start.saturating_add(max);
        if self.ctrl_pos < self.ctrl.len() {
            let n = (self.ctrl.len() - self.ctrl_pos).min(max);
            out.put_slice(&self.ctrl[self.ctrl_pos..self.ctrl_pos + n]);
            self.ctrl_pos += n;
            for id in self.opens_unstamped.drain(..) {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.mark_first_grant(now);
                }
            }
            if let Some(end) = self.ping_mark {
                if self.ctrl_pos >= end {
                    self.ping_mark = None;
                    if let Some((value, None)) = self.ping_out {
                        self.ping_out = Some((value, Some(now)));
                    }
                }
            }
            if self.ctrl_pos < self.ctrl.len() {
                return n;
            }
            self.ctrl.clear();
            self.ctrl_pos = 0;
            if self.ctrl.capacity() > 64 * 1024 {
                self.ctrl = Vec::new();
            }
        }
        if self.closed.is_none() {
            self.transmit_data(out, limit);
        }
        out.len() - start
    }

    fn transmit_data(&mut self, out: &mut impl Sink, limit: usize) {
        let quantum = self.config.send_quantum;
        let send_buffer = self.send_buffer();
        while let Some(id) = self.ready.pop_front() {
            let space = limit.saturating_sub(out.len());
            let conn_credit = self.conn_send_limit - self.conn_sent;
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            let pending = s.send_buf.len();
            if space <= HEADER_LEN || (pending > 0 && conn_credit == 0) {
                // No room, or the whole connection waits for credit: keep the turn order for later.
                self.ready.push_front(id);
                break;
            }
            let len = pending
                .min(quantum)
                .min(space - HEADER_LEN)
                .min(conn_credit as usize);
            let fin = s.send == SendState::FinQueued && len == pending;
            s.queued = false;
            if len == 0 && !fin {
                continue;
            }
            if len > 0 && self.config.auto_tune {
                note_activity(&mut self.recent, id, self.now);
            }
            out.put_slice(&frame::data_header(id, fin, len as u32));
            out.put_from(&mut s.send_buf, len);
            if s.send_buf.is_empty() {
                // Idle streams must cost almost nothing: give the buffer back.
                s.send_buf = BytesMut::new();
            }
            self.conn_sent += len as u64;
            if fin {
                s.send = SendState::FinSent;
            }
            if s.want_writable
                && s.send_buf.len() <= send_buffer / 2
                && s.send_capacity(send_buffer) > 0
            {
                s.want_writable = false;
                self.events.push_back(Event::Writable(id));
            }
            if s.has_transmit() {
                s.queued = true;
                self.ready.push_back(id);
            }
            if fin {
                self.remove_if_done(id);
            }
        }
        self.note_send_credit();
    }

    /// Whether anything waits to be transmitted (control frames or stream data, credit permitting).
    pub fn wants_transmit(&self) -> bool {
        self.transmit_enabled
            && (self.ctrl_pos < self.ctrl.len()
                || (self.closed.is_none()
                    && !self.ready.is_empty()
                    && self.conn_send_limit > self.conn_sent))
    }

    /// Return credit for `n` bytes of stream `id` that left the session, with auto-tuning.
    pub(super) fn release_credit(&mut self, id: StreamId, n: usize) {
        self.release_stream_credit(id, n);
        self.release_connection_credit(n);
    }

    /// The stream's part of [`Session::release_credit`].
    pub(super) fn release_stream_credit(&mut self, id: StreamId, n: usize) {
        let now = self.now;
        let (min_rtt, srtt) = (self.min_rtt, self.rtt);
        let (auto_tune, max_window) = (self.config.auto_tune, self.config.max_stream_window);
        let shared = auto_tune && self.has_company(id);
        let queue_floor = if shared {
            self.config.shared_queue_floor
        } else {
            self.config.tune_queue_floor
        };
        if let Some(s) = self.streams.get_mut(&id) {
            s.recv_consumed += n as u64;
            if s.recv == RecvState::Open {
                if shared {
                    // Another stream is in use: hold this one to the smaller cap at once, even
                    // if it grew while alone; credit already granted stays valid.
                    if let Some(cap) = window_cap(s, min_rtt, queue_floor, true) {
                        let floor = self.config.stream_window;
                        if s.window > cap.max(floor) {
                            s.window = cap.max(floor);
                            tracing::debug!(id, window = s.window, "stream window held down");
                        }
                    }
                }
                let unsent = (s.recv_consumed + u64::from(s.window)).saturating_sub(s.recv_limit);
                // A quarter of the window (half with company); or whatever is consumed once the
                // sender has used all its credit: it sits idle until this update comes. At half
                // a window (h2's rule) only about half a window moved per round trip on a long
                // path, the delivery rate the cap is computed from fell with it, and a stream
                // alone settled where the link ran at ~80 % (docs/protocol.md). With company
                // the window is held small on purpose, and the caps were measured with half:
                // at a quarter more of it is in flight, which is queue the other stream waits in
                // (loopback loaded p99 +20-80 %).
                let sender_blocked = s.recv_received == s.recv_limit && unsent > 0;
                let step = if shared { s.window / 2 } else { s.window / 4 };
                let step_due = unsent >= u64::from(step) || sender_blocked;
                // Alone, a fresh grant sample is judged at once, not at the next credit step: on
                // a long path the step can fall just short as a burst ends, and the growth then
                // waited a round trip for the next burst (at 100 ms, 1 Gbit/s: 12.5 MB not
                // carried). Not with company: such an update also returns the credit not yet
                // due, more of the window is in flight, and that is queue the other stream
                // waits in (netem clean50, 1-byte round trip beside a download: 56/68 ms
                // p50/p99 -> 90/104 ms).
                if step_due || (!shared && s.grant_rtt.is_some()) {
                    let before = s.window;
                    let sample = s.grant_rtt.take();
                    let grown = if auto_tune && s.window < max_window {
                        let quiet = quiet_path(sample, min_rtt);
                        grown_window(s, now, min_rtt, srtt, queue_floor, quiet, shared)
                    } else {
                        s.window
                    };
                    if grown > s.window {
                        s.window = grown.min(max_window);
                        tracing::debug!(
                            id,
                            window = s.window,
                            max_rate = s.max_rate,
                            ?min_rtt,
                            "stream window grown"
                        );
                    }
                    // Nothing to grant while credit given under a larger window is still
                    // unused: a window held down beside company and grown again once alone can
                    // stay below it. (Subtracting anyway wrapped, in release builds, into an
                    // increment of nearly 4 GiB that the peer rejects, ending the carrier: a
                    // pair_ops fuzz finding.)
                    let inc = (s.recv_consumed + u64::from(s.window)).saturating_sub(s.recv_limit);
                    if (step_due || s.window > before) && inc > 0 {
                        s.window_epoch = Some(now);
                        s.recv_limit += inc;
                        if s.rtt_mark.is_none() {
                            s.rtt_mark = Some((s.recv_limit, now));
                        }
                        frame::encode_window_update(&mut self.ctrl, id, inc as u32);
                    }
                }
            }
        }
    }

    /// Whether another stream, still open, carried data within [`COMPANY_FOR`].
    fn has_company(&self, id: StreamId) -> bool {
        self.recent.iter().flatten().any(|&(other, t)| {
            other != id
                && self.now.saturating_duration_since(t) < COMPANY_FOR
                && self.streams.contains_key(&other)
        })
    }

    pub(super) fn release_connection_credit(&mut self, n: usize) {
        self.conn_consumed += n as u64;
        self.grant_connection_credit();
    }

    /// Returns the connection credit consumed since the last grant once it reaches what the
    /// peer may still send (half the window when nothing is held; a zero room counts too). Held
    /// bytes (readers that stopped) shrink the window in use, so the step shrinks with it: at
    /// a fixed half window, once more than half was held the step could never be reached.
    /// Checked when bytes are read and when they arrive: if the bytes that fill the last room
    /// land on streams nobody reads, no read follows to return the credit read before them,
    /// and the carrier stopped for every stream (a 4 MiB exchange beside 200 stalled
    /// downloads got no byte in 60 s).
    pub(super) fn grant_connection_credit(&mut self) {
        let window = u64::from(self.config.connection_window);
        // Saturating: a limit raised by `relieve_starved` lies beyond consumed + window.
        let unsent = (self.conn_consumed + window).saturating_sub(self.conn_recv_limit);
        let room = self.conn_recv_limit - self.conn_received;
        if unsent > 0 && unsent >= room && self.closed.is_none() {
            self.conn_recv_limit += unsent;
            frame::encode_window_update(&mut self.ctrl, 0, unsent as u32);
        }
        self.relieve_starved();
    }

    /// Grants connection credit beyond the window while bytes nobody takes hold most of it and
    /// a stream has nothing held at all (its reader waits, or it is idle). Without this, streams
    /// read one after another deadlocked: those not read yet filled the window between them
    /// and the one being read got no byte (1000 downloads over a TCP carrier stopped at
    /// 4.9 MiB). The stream windows still bound what the session buffers: the extra credit
    /// goes to streams that have stream credit left, and is used up once they have none.
    /// Checked only when the room is low and mostly held, so the scan over the streams is rare.
    pub(super) fn relieve_starved(&mut self) {
        let window = u64::from(self.config.connection_window);
        let room = self.conn_recv_limit - self.conn_received;
        if room >= window / 8 || self.connection_held() < window / 2 || self.closed.is_some() {
            return;
        }
        if !self.streams.values().any(crate::stream::Stream::is_starved) {
            return;
        }
        let inc = (window / 4).max(1) - room;
        self.conn_recv_limit += inc;
        frame::encode_window_update(&mut self.ctrl, 0, inc as u32);
    }

    pub(super) fn queue_ping(&mut self) {
        self.ping_counter += 1;
        frame::encode_ping(&mut self.ctrl, false, self.ping_counter.to_be_bytes());
        self.ping_out = Some((self.ping_counter, None));
        self.ping_mark = Some(self.ctrl.len());
        self.last_ping = self.now;
        self.received_at_ping = self.conn_received;
    }

    fn keepalive_enabled(&self) -> bool {
        match self.role {
            Role::Client => self.auth != Auth::Start,
            Role::Server => self.auth == Auth::Done,
        }
    }

    /// When [`Session::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        let mut t = self.last_recv + self.config.idle_timeout;
        if let Some((_, deadline)) = self.probe {
            t = t.min(deadline);
        }
        if let Some((due, _)) = self.answer_due {
            t = t.min(due);
        }
        if self.role == Role::Server && self.auth != Auth::Done {
            t = t.min(self.created + self.config.auth_timeout);
        }
        if self.keepalive_enabled() && self.ping_out.is_none() {
            t = t.min(self.last_recv.max(self.last_ping) + self.config.keepalive_interval);
            if self.wants_rtt_probe() {
                t = t.min(self.last_ping + self.config.rtt_probe_interval);
            }
        }
        Some(t)
    }

    /// Advance timers to `now`: keepalive pings, the idle timeout (carrier dead) and the server's
    /// authentication deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.closed.is_some() {
            return;
        }
        if now >= self.last_recv + self.config.idle_timeout {
            // Said, in case the peer was only paused (a laptop asleep, a stopped process): on
            // waking it reads why its carrier ended instead of a bare close.
            let said = format!(
                "idle timeout: nothing received for {}s",
                self.config.idle_timeout.as_secs()
            );
            self.close(CloseReason::Timeout, Some((ErrorCode::NoError, said)));
            return;
        }
        if let Some((due, within)) = self.answer_due {
            if now >= due {
                self.answer_due = None;
                self.probe(now, within);
            }
        }
        if let Some((started, deadline)) = self.probe {
            if now >= deadline {
                let silent = now.saturating_duration_since(self.last_recv);
                let waited = deadline.saturating_duration_since(started);
                self.close(CloseReason::Unanswered { silent, waited }, None);
                return;
            }
        }
        if self.role == Role::Server
            && self.auth != Auth::Done
            && now >= self.created + self.config.auth_timeout
        {
            // Rounded: the driver passes what is left of its budget after the upgrade, which
            // printed as "9.999917848s".
            let detail = format!(
                "no authentication within {:.1?} of the connection",
                self.config.auth_timeout
            );
            self.close(
                CloseReason::AuthTimeout,
                Some((ErrorCode::AuthTimeout, detail)),
            );
            return;
        }
        if self.keepalive_enabled()
            && self.ping_out.is_none()
            && (now >= self.last_recv.max(self.last_ping) + self.config.keepalive_interval
                || (self.wants_rtt_probe()
                    && now >= self.last_ping + self.config.rtt_probe_interval))
        {
            self.queue_ping();
        }
    }

    /// Window auto-tuning judges queueing against the minimum RTT. The first samples come while
    /// both ends are busy starting up, so while data arrives, a PING now and then finds a quiet
    /// moment of the path and brings the minimum down to it. Streams that sit idle (an ssh
    /// session nobody types in) need no tuning, so they cost no probes: only the keepalive.
    fn wants_rtt_probe(&self) -> bool {
        self.config.auto_tune
            && !self.streams.is_empty()
            && self.conn_received > self.received_at_ping
    }
}

/// Shortest RTT auto-tuning assumes: below it, timer and scheduling noise would dominate.
const MIN_TUNE_RTT: Duration = Duration::from_micros(50);

/// The stream's receive window after this update: unchanged, or grown up to 4× at once (8×
/// alone on a `quiet` path).
///
/// - The window must limit the stream: a credit step of it (a quarter alone, half with company)
///   went out within two RTTs of the previous update, so the reader keeps up and the sender
///   waits for credit (a slow reader gets no more memory).
/// - It grows to 1½ times the path's bandwidth-delay product, measured as the stream's best
///   recent delivery rate (`Stream::sample_rate`, bins of 1/8 minimum RTT) times 1½ *minimum*
///   RTTs, plus the rate times `floor`. Whatever a window holds beyond the BDP waits in a queue
///   in front of every other stream of the carrier, so the cap sets how long an interactive
///   stream waits behind a bulk one: ½ RTT at most. Not less: the measured rate runs up to a
///   quarter below the link's (a window-limited sender's bursts do not fill every bin), and a
///   window under the BDP leaves the link idle. Until session 4 the cap was 2 ×
///   BDP and windows moved in powers of two (512 KiB, 1 MiB, ...), so at 50 ms and 100 Mbit/s
///   (BDP 625 KB) the window stopped at 1 MiB and a round trip beside a bulk stream took 94 ms
///   (p50) and 114 ms (p99) against 51 ms idle. Judged by the smoothed RTT alone (session 1),
///   windows grew until our own queue filled them (330 ms of queue at 50 ms RTT). Judged by
///   how late each update's bytes came (an earlier version), a lost segment looked like a queue
///   and 1 % loss held windows at a fraction of the link.
/// - Or, while no bin has shown a rate at all (every burst arrived in one piece, behind a
///   buffering proxy), grow 8× (4× with company) when `quiet` (see `quiet_path`): the last
///   grant came back within 1¼ minimum RTTs, so the window builds no queue. On a link that
///   paces bytes at its rate, such a window is at most a quarter of the BDP, so 8× stays under
///   the 2 × BDP cap, 4× under 1.5 ×. Doubling took six round trips from 256 KiB to a 100 ms,
///   1 Gbit/s path's 12.5 MB and carried 75 % of it in the first 2.5 s; 8× takes two (with
///   the first window judged as a grant, `Stream::mark_first_grant`).
///   Once there is a rate, it alone decides the size: the delay rule let windows run to 8 MiB
///   (600 ms of queue at 50 ms) when grants were small.
/// - `floor` (4 ms): on sub-millisecond paths per-hop wakeups, not the path, set the pace, and
///   windows of a few hundred KiB cost a third of the throughput and more CPU per byte; a
///   few milliseconds of queue behind a stream alone nobody notices. It was 1 ms until a
///   slower host (session 19): through the edge, with four processes on two cores, agent-tls
///   pulled 2.6–3.3 Gbit/s at 1 ms and 3.2–4.4 at 4 ms (six alternating 6 s pulls each), the
///   agent's CPU per Gbit/s falling with it; agent-tcp, one process fewer, was the same. With
///   company it is 250 µs (`shared_queue_floor`): that queue is what the other stream waits
///   behind, and at 1 ms a 1-byte round trip beside a loopback bulk download took 1.1 ms p50 /
///   2.4–2.9 ms p99 (idle: 0.2 ms p99); at 250 µs 0.34–0.41 / 0.63–0.76 ms.
fn grown_window(
    s: &crate::stream::Stream,
    now: Instant,
    min_rtt: Option<Duration>,
    srtt: Option<Duration>,
    floor: Duration,
    quiet: bool,
    shared: bool,
) -> u32 {
    let (Some(min), Some(epoch)) = (min_rtt, s.window_epoch) else {
        return s.window;
    };
    let min = min.max(MIN_TUNE_RTT);
    let rtt = srtt.unwrap_or(min).max(min);
    if now.saturating_duration_since(epoch) >= rtt * 2 {
        return s.window;
    }
    let cap = window_cap(s, min_rtt, floor, shared).unwrap_or(0);
    let step = if quiet && !shared { 8 } else { 4 };
    if cap > s.window {
        cap.min(s.window.saturating_mul(step))
    } else if quiet && s.max_rate == 0 {
        s.window.saturating_mul(step)
    } else {
        s.window
    }
}

/// The most a stream's window may hold: its best recent delivery rate times 2 minimum RTTs
/// alone, 1½ with company (see `grown_window`), plus the rate times `floor` (the caller's
/// choice for either case). `None` before
/// the first RTT sample.
pub(super) fn window_cap(
    s: &crate::stream::Stream,
    min_rtt: Option<Duration>,
    floor: Duration,
    shared: bool,
) -> Option<u32> {
    let min = min_rtt?.max(MIN_TUNE_RTT);
    let horizon = if shared { min + min / 2 } else { min * 2 } + floor;
    let cap = u128::from(s.max_rate) * horizon.as_nanos() / 1_000_000_000;
    Some(cap.min(u128::from(u32::MAX)) as u32)
}

/// How long after its last byte a stream still counts as company for a bulk one. Long enough
/// to span the pauses of someone typing in an ssh session, so the bulk window does not grow
/// back between keystrokes and make the next one wait behind a refilled queue.
const COMPANY_FOR: Duration = Duration::from_secs(10);

/// Records that stream `id` carried data at `now`.
pub(super) fn note_activity(
    recent: &mut [Option<(StreamId, Instant)>; 2],
    id: StreamId,
    now: Instant,
) {
    match recent[0] {
        Some((newest, _)) if newest == id => recent[0] = Some((id, now)),
        _ => {
            recent[1] = recent[0];
            recent[0] = Some((id, now));
        }
    }
}

/// Whether the last grant's bytes all came back within 1¼ minimum RTTs: the window builds no
/// queue, so it may double even when no burst showed the path's rate (bursts that arrive in
/// one piece, see `Stream::sample_rate`). On lossy paths recovery makes such samples long, and
/// the rate rule decides alone.
fn quiet_path(grant_rtt: Option<Duration>, min_rtt: Option<Duration>) -> bool {
    let (Some(sample), Some(min)) = (grant_rtt, min_rtt) else {
        return false;
    };
    let min = min.max(MIN_TUNE_RTT);
    sample <= min + min / 4
}
