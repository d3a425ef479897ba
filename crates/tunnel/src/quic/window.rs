//! Sizes a connection's send window to its path and to the streams that share it.
//!
//! quinn's windows are fixed, not tuned, and a bulk transfer keeps all it may in flight. On a
//! path of under a millisecond (loopback, a LAN), where the receiver's CPU is the bottleneck,
//! 64 MiB of it sat queued ahead of every other stream's bytes: a 1-byte round trip beside a
//! bulk download took 11-12 ms p50 / 23-28 ms p99 on loopback; with 2 MiB in flight
//! 2.6-2.7 / 5.6-7.4 ms, throughput unchanged within the noise (1 MiB cost a fifth of it).
//! Now the window is smaller only while a light stream needs it (see below).
//! The sender's window sets that bound, not the receiver's: a receive window that small let one
//! local reader that stopped reading hold all of it, and stop the carrier (see
//! `RECEIVE_WINDOW`). The path is judged by its round trip, not by the address: a loopback
//! peer can be a relay in front of a long path (the benchmark's WAN emulation is one, where a
//! 2 MiB *stream* window held 1 Gbit/s at 100 ms to 14 %).
//!
//! Two refinements over judging once, by the handshake:
//! - **Any later sample under a millisecond proves the path short.** Queueing only adds to a
//!   round trip, and the handshake's includes both ends' certificate work: on a busy 2-core
//!   host the client measured 0.8-1.6 ms over loopback and kept the 64 MiB window for good.
//! - **A light stream beside a bulk one gets a smaller window over it** ([`SHARED_WINDOW`]), as
//!   the TCP carrier's auto-tuning holds a stream with company to a smaller window: the
//!   in-flight bytes are the queue an ssh keystroke waits behind. "Light" is by rate
//!   ([`LIGHT_BYTES`] per [`PERIOD`]), not by being another stream: sixteen bulk downloads
//!   together keep the larger window, since none of them waits for a round trip, and at
//!   512 KiB a carrier's whole throughput fell by a fifth to a half.
//!
//! Sans-IO: [`Fit`] decides from the times and byte counts it is given; [`WindowFit`] applies
//! its answers to the quinn connection.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Unacknowledged bytes a connection may have sent or queued, over a long path.
pub(super) const SEND_WINDOW: u64 = 64 * 1024 * 1024;

/// Below this round trip a path counts as short.
const SHORT_PATH_RTT: Duration = Duration::from_millis(1);

/// Send window of a whole connection over a short path, for bulk streams alone. It was 2 MiB
/// while it also had to keep an interactive stream's wait short; with [`SHARED_WINDOW`] doing
/// that, sixteen downloads together moved 3.9 / 4.0 Gbit/s at 2 MiB, 5.0 at 4 MiB,
/// 5.3 / 5.4 / 5.4 at 8 MiB and 5.5 at 16 MiB on loopback, one alone the same, the loaded
/// round trip the same (session 19). A light stream's first answer still waits behind it
/// (about 15 ms at 5 Gbit/s), before its company shrinks the window.
const SHORT_PATH_WINDOW: u64 = 8 * 1024 * 1024;

/// Send window over a short path while a light stream shares the connection with a bulk one.
/// On loopback, a 1-byte round trip beside a bulk download: 7.7 / 24.8 ms p50 / p99 at 2 MiB,
/// 4.1 / 20.4 at 1 MiB, 2.1 / 10.0 at 512 KiB, 1.6 / 9.3 at 256 KiB, where the download itself
/// fell to a third (one 2-round run each, session 19).
const SHARED_WINDOW: u64 = 512 * 1024;

/// A stream is light while it writes less than this per [`PERIOD`], in the current and the
/// previous one (2 Mbit/s: typing, queries, a page now and then).
const LIGHT_BYTES: u64 = 256 * 1024;

/// The period stream rates are counted over.
const PERIOD: Duration = Duration::from_secs(1);

/// How long after its last write a light stream still counts as company: long enough to span
/// the pauses of someone typing, as the TCP carrier's `COMPANY_FOR`.
const COMPANY_FOR: Duration = Duration::from_secs(10);

/// How often a path not yet known to be short is looked at again (only while streams write).
const RECHECK: Duration = Duration::from_secs(1);

/// What one stream wrote lately.
#[derive(Debug, Clone, Copy)]
struct Activity {
    /// Start of the current period.
    start: Instant,
    /// Bytes in the current period.
    this: u64,
    /// Bytes in the period before it (0 if it was not the one just before).
    last: u64,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Self {
            start: now,
            this: 0,
            last: 0,
        }
    }

    /// The counts as of `now`: periods that went by without a write count as empty.
    fn counts(&self, now: Instant) -> (u64, u64) {
        let age = now.saturating_duration_since(self.start);
        if age >= PERIOD * 2 {
            (0, 0)
        } else if age >= PERIOD {
            (0, self.this)
        } else {
            (self.this, self.last)
        }
    }

    fn add(&mut self, now: Instant, n: u64) {
        if now.saturating_duration_since(self.start) >= PERIOD {
            (self.this, self.last) = self.counts(now);
            self.start = now;
        }
        self.this += n;
    }

    fn is_light(&self, now: Instant) -> bool {
        let (this, last) = self.counts(now);
        this < LIGHT_BYTES && last < LIGHT_BYTES
    }
}

/// The send window decision for one connection (see the module documentation).
#[derive(Debug)]
pub(super) struct Fit {
    short: bool,
    next_check: Instant,
    streams: HashMap<u64, Activity>,
    /// The stream that last wrote while light, and when.
    light: Option<(u64, Instant)>,
    window: u64,
}

impl Fit {
    /// A connection whose handshake measured `rtt`.
    pub(super) fn new(now: Instant, rtt: Duration) -> Self {
        let short = rtt < SHORT_PATH_RTT;
        Self {
            short,
            next_check: now + RECHECK,
            streams: HashMap::new(),
            light: None,
            window: if short {
                SHORT_PATH_WINDOW
            } else {
                SEND_WINDOW
            },
        }
    }

    /// The send window to use now.
    pub(super) fn window(&self) -> u64 {
        self.window
    }

    /// Stream `id` handed `n` bytes to the connection at `now`. Returns the send window to set
    /// when it changes. `rtt` gives the connection's round trip; it is asked at most once per
    /// [`RECHECK`], and only while the path is not known to be short.
    pub(super) fn wrote(
        &mut self,
        now: Instant,
        id: u64,
        n: u64,
        rtt: impl FnOnce() -> Duration,
    ) -> Option<u64> {
        let activity = self.streams.entry(id).or_insert_with(|| Activity::new(now));
        activity.add(now, n);
        let light = activity.is_light(now);
        if light {
            self.light = Some((id, now));
            // A light stream's own writes decide nothing: the bulk one's next write does.
            return None;
        }
        if self.light.is_some_and(|(l, _)| l == id) {
            // It was light and no longer is: a download that began with a small write.
            self.light = None;
        }
        if !self.short && now >= self.next_check {
            self.next_check = now + RECHECK;
            self.short = rtt() < SHORT_PATH_RTT;
        }
        if !self.short {
            return None;
        }
        // The light stream is still light: one that wrote more since was forgotten above (or
        // when it ended), and a quiet one's counts only fall.
        let company = self
            .light
            .is_some_and(|(_, at)| now.saturating_duration_since(at) < COMPANY_FOR);
        let window = if company {
            SHARED_WINDOW
        } else {
            SHORT_PATH_WINDOW
        };
        (window != self.window).then(|| {
            self.window = window;
            window
        })
    }

    /// Stream `id` ended.
    pub(super) fn closed(&mut self, id: u64) {
        self.streams.remove(&id);
        if self.light.is_some_and(|(l, _)| l == id) {
            self.light = None;
        }
    }
}

/// [`Fit`] applied to a quinn connection; shared by the connection's streams.
pub(super) struct WindowFit {
    conn: quinn::Connection,
    fit: Mutex<Fit>,
}

impl WindowFit {
    /// Judges the connection by its handshake and sets its window if the path is short.
    pub(super) fn new(conn: &quinn::Connection) -> Self {
        let fit = Fit::new(Instant::now(), conn.rtt());
        if fit.window() != SEND_WINDOW {
            conn.set_send_window(fit.window());
        }
        Self {
            conn: conn.clone(),
            fit: Mutex::new(fit),
        }
    }

    pub(super) fn wrote(&self, id: quinn::StreamId, n: usize) {
        let Ok(mut fit) = self.fit.lock() else {
            return;
        };
        if let Some(w) = fit.wrote(Instant::now(), key(id), n as u64, || self.conn.rtt()) {
            let light = fit.light.map(|(l, _)| l);
            tracing::debug!(window = w, writer = key(id), ?light, "QUIC send window set");
            self.conn.set_send_window(w);
        }
    }

    pub(super) fn closed(&self, id: quinn::StreamId) {
        if let Ok(mut fit) = self.fit.lock() {
            fit.closed(key(id));
        }
    }
}

fn key(id: quinn::StreamId) -> u64 {
    quinn::VarInt::from(id).into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const KIB: u64 = 1024;

    fn fast() -> Duration {
        Duration::from_micros(300)
    }

    #[test]
    fn a_short_handshake_sets_the_short_window_and_a_long_one_leaves_quinns() {
        let now = Instant::now();
        assert_eq!(Fit::new(now, fast()).window(), SHORT_PATH_WINDOW);
        let mut long = Fit::new(now, 50 * MS);
        assert_eq!(long.window(), SEND_WINDOW);
        let set: Vec<_> = (0..5000)
            .filter_map(|i| long.wrote(now + MS * i, 0, 256 * KIB, || 50 * MS))
            .collect();
        assert!(set.is_empty(), "a long path keeps its window: {set:?}");
    }

    #[test]
    fn a_later_sample_under_a_millisecond_makes_the_path_short_asked_once_a_second() {
        let start = Instant::now();
        let mut fit = Fit::new(start, Duration::from_micros(1400));
        assert_eq!(fit.window(), SEND_WINDOW);
        let mut asked = 0;
        let mut set = Vec::new();
        for i in 0..2500u32 {
            let rtt = if i < 1500 { 1400 } else { 400 };
            let w = fit.wrote(start + MS * i, 0, 256 * KIB, || {
                asked += 1;
                Duration::from_micros(rtt)
            });
            set.extend(w.map(|w| (i, w)));
        }
        assert_eq!(asked, 2, "at 1 s and 2 s, not per write");
        assert_eq!(set, [(2000, SHORT_PATH_WINDOW)]);
    }

    #[test]
    fn a_light_stream_beside_a_bulk_one_shrinks_the_window_until_it_goes_quiet() {
        let start = Instant::now();
        let mut fit = Fit::new(start, fast());
        let mut set = Vec::new();
        for t in 0..13_000u32 {
            // A keystroke a second on stream 4, three of them.
            if matches!(t, 100 | 1100 | 2100) {
                assert_eq!(fit.wrote(start + MS * t, 4, 1, fast), None);
            }
            set.extend(
                fit.wrote(start + MS * t, 0, 256 * KIB, fast)
                    .map(|w| (t, w)),
            );
        }
        // Held while the light stream was heard within 10 s.
        assert_eq!(set, [(100, SHARED_WINDOW), (12_100, SHORT_PATH_WINDOW)]);
    }

    #[test]
    fn bulk_streams_together_keep_the_large_window() {
        let start = Instant::now();
        let mut fit = Fit::new(start, fast());
        // Sixteen downloads whose first writes are small: each is light only until it has
        // written 256 KiB in a period.
        let mut set = Vec::new();
        for round in 0..2000u32 {
            for id in 0..16u64 {
                let n = if round < 4 { 64 * KIB } else { 256 * KIB };
                set.extend(fit.wrote(start + MS * round, id * 4, n, fast));
            }
        }
        assert_eq!(fit.window(), SHORT_PATH_WINDOW);
        assert!(
            set.len() <= 2,
            "at most one shrink at the start and its undoing: {set:?}"
        );
    }

    #[test]
    fn a_light_stream_that_turns_bulk_or_ends_is_no_longer_company() {
        let start = Instant::now();
        let mut fit = Fit::new(start, fast());
        let _ = fit.wrote(start, 0, 256 * KIB, fast);
        let _ = fit.wrote(start, 4, 10, fast);
        assert_eq!(
            fit.wrote(start + MS, 0, 256 * KIB, fast),
            Some(SHARED_WINDOW)
        );
        // Stream 4 starts a download of its own: now two bulk streams, no light one.
        assert_eq!(
            fit.wrote(start + MS * 2, 4, 256 * KIB, fast),
            Some(SHORT_PATH_WINDOW)
        );
        assert_eq!(fit.wrote(start + MS * 3, 0, 256 * KIB, fast), None);
        // A new light stream, which then ends.
        let _ = fit.wrote(start + MS * 4, 8, 10, fast);
        assert_eq!(
            fit.wrote(start + MS * 5, 0, 256 * KIB, fast),
            Some(SHARED_WINDOW)
        );
        fit.closed(8);
        assert_eq!(
            fit.wrote(start + MS * 6, 0, 256 * KIB, fast),
            Some(SHORT_PATH_WINDOW)
        );
    }

    #[test]
    fn rates_are_counted_per_period_and_a_quiet_period_counts_as_empty() {
        let start = Instant::now();
        let mut a = Activity::new(start);
        a.add(start, 300 * KIB);
        assert!(!a.is_light(start));
        // The next period still remembers the busy one; the one after does not.
        assert!(!a.is_light(start + PERIOD));
        assert!(a.is_light(start + PERIOD * 2));
        a.add(start + PERIOD * 2, 10);
        assert!(a.is_light(start + PERIOD * 2));
        a.add(start + PERIOD * 3, 200 * KIB);
        a.add(start + PERIOD * 3 + MS, 100 * KIB);
        assert!(!a.is_light(start + PERIOD * 3 + MS));
    }
}
