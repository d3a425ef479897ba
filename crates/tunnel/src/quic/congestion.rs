//! Congestion control of QUIC carriers: quinn's Cubic, minus its reaction to losses that do not
//! look like congestion.
//!
//! Cubic takes every lost packet for a full queue and shrinks its window to 0.7×. On a path
//! that loses packets at random (Wi-Fi, a mobile link, a lossy peering) that happens several
//! times a round trip at any useful window, and a QUIC carrier over a 50 ms, 100 Mbit/s link
//! with 1 % loss each way carried 6 % of it, where TCP on this kernel's BBR carried 88 %.
//! A full queue shows before it overflows: the round trip grows by the queue's delay. So a
//! loss counts as congestion (and reaches Cubic) when
//!
//! - the round trip stands half above the minimum (at least [`QUEUE_FLOOR`]), in the
//!   smoothed figure and in the latest sample alike: a queue is there (the smoothed one alone
//!   lags a queue that drains after a reduction, the latest alone jumps with one late
//!   acknowledgement);
//! - or more than 1 in [`LOSS_RATIO`] of the bytes of the last two rounds were lost (at least
//!   [`MIN_SAMPLE_PACKETS`] packets' worth counted, so a few losses in a small window count): a
//!   path whose queue is too short to show in the round trip still overflows, and then the
//!   loss rate climbs as the window grows;
//! - or it is persistent congestion, or an ECN mark (explicit, never random).
//!
//! Otherwise the lost bytes are resent as always and the window stays. Sans-IO: [`LossJudge`]
//! sees numbers and times only, so its rules are unit-tested without a connection.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics, CubicConfig};
use quinn_proto::RttEstimator;

/// Queue delay (round trip minus its minimum) that marks a loss as congestion, at least:
/// below it timer and scheduling noise (a receiver descheduled for a moment on a busy host)
/// would pass for a queue. Above it, half the minimum round trip: a drop-tail queue of one
/// bandwidth-delay product holds a whole minimum round trip when it overflows, and a quarter
/// was within the jitter of a loaded path (at 50 ms, round trips of 60-68 ms at windows far
/// below the link's, and every loss there cut the window again, to 12 % of the link).
pub(crate) const QUEUE_FLOOR: Duration = Duration::from_millis(1);

/// A loss is congestion when more than one byte in this many was lost over the last two
/// rounds: 4 %. At 2 % (BBRv2's threshold) chance clusters of a path's 1 % random loss
/// crossed it every few seconds: judged after every loss, the rate of two rounds is the
/// highest of many samples, and each crossing cost Cubic's 0.7× and seconds to win back
/// (1 % loss at 50 ms, 100 Mbit/s: 28-55 % of the link instead of ~90 %).
pub(crate) const LOSS_RATIO: u64 = 25;

/// The loss rate is judged over at least this many packets' worth of bytes, so that one loss
/// in a small window (early in slow start) is not 1 in 20.
pub(crate) const MIN_SAMPLE_PACKETS: u64 = 512;

/// What a loss means, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No queue and a low loss rate: the window stays.
    Random,
    /// The round trip (the smaller of the smoothed one and the latest sample) stands this far
    /// above the minimum.
    Queue { queue: Duration },
    /// `lost` of the last two rounds' `counted` bytes were lost: over 4 %.
    Rate { lost: u64, counted: u64 },
    /// quinn declared persistent congestion.
    Persistent,
    /// An ECN mark.
    Ecn,
    /// No round trip measured yet: no ground to call it random.
    Unmeasured,
}

impl Verdict {
    pub(crate) fn is_congestion(self) -> bool {
        self != Verdict::Random
    }
}

/// Bytes acknowledged and lost in one round trip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    acked: u64,
    lost: u64,
}

/// A path's round trips as of the last acknowledgement.
#[derive(Clone, Copy, Debug)]
struct Rtts {
    min: Duration,
    smoothed: Duration,
    /// From the most recently sent packet of the last batch of acknowledgements (quinn keeps
    /// its own latest sample private), ACK delay included.
    latest: Duration,
}

/// Decides whether a loss is congestion (see the module documentation).
#[derive(Clone, Debug)]
pub(crate) struct LossJudge {
    /// `None` until the first acknowledgement.
    rtt: Option<Rtts>,
    /// When the batch of acknowledgements that `rtt.latest` comes from arrived: quinn hands
    /// over the packets of one ACK frame with one `now`, and the newest of them gives the
    /// smallest sample.
    batch: Option<Instant>,
    round_start: Option<Instant>,
    current: Tally,
    previous: Tally,
    mtu: u64,
}

impl LossJudge {
    pub(crate) fn new(mtu: u16) -> Self {
        Self {
            rtt: None,
            batch: None,
            round_start: None,
            current: Tally::default(),
            previous: Tally::default(),
            mtu: u64::from(mtu),
        }
    }

    pub(crate) fn on_mtu_update(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu);
    }

    /// `bytes` sent at `sent` were acknowledged; the path's round trips as quinn measures them.
    pub(crate) fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        min_rtt: Duration,
        srtt: Duration,
    ) {
        let sample = now.saturating_duration_since(sent);
        let latest = match self.rtt {
            Some(r) if self.batch == Some(now) => r.latest.min(sample),
            _ => sample,
        };
        self.batch = Some(now);
        self.rtt = Some(Rtts {
            min: min_rtt,
            smoothed: srtt,
            latest,
        });
        self.roll(now);
        self.current.acked = self.current.acked.saturating_add(bytes);
    }

    /// `lost_bytes` were declared lost (0 for an ECN mark): what that loss means.
    pub(crate) fn judge(&mut self, now: Instant, persistent: bool, lost_bytes: u64) -> Verdict {
        self.roll(now);
        self.current.lost = self.current.lost.saturating_add(lost_bytes);
        if persistent {
            return Verdict::Persistent;
        }
        if lost_bytes == 0 {
            return Verdict::Ecn;
        }
        let Some(r) = self.rtt else {
            return Verdict::Unmeasured;
        };
        let queue = r.smoothed.min(r.latest).saturating_sub(r.min);
        if queue > (r.min / 2).max(QUEUE_FLOOR) {
            return Verdict::Queue { queue };
        }
        let lost = self.current.lost.saturating_add(self.previous.lost);
        let counted = (self.current.acked.saturating_add(self.previous.acked))
            .saturating_add(lost)
            .max(MIN_SAMPLE_PACKETS.saturating_mul(self.mtu));
        if lost.saturating_mul(LOSS_RATIO) > counted {
            Verdict::Rate { lost, counted }
        } else {
            Verdict::Random
        }
    }

    /// Starts a new round once a smoothed round trip has passed since the current one began;
    /// after a silence of two or more, neither the current nor the previous tally is recent.
    fn roll(&mut self, now: Instant) {
        let srtt = self.rtt.map_or(Duration::ZERO, |r| r.smoothed);
        match self.round_start {
            None => self.round_start = Some(now),
            Some(start) => {
                let elapsed = now.saturating_duration_since(start);
                if elapsed >= srtt.saturating_mul(2) {
                    self.previous = Tally::default();
                    self.current = Tally::default();
                    self.round_start = Some(now);
                } else if elapsed >= srtt {
                    self.previous = self.current;
                    self.current = Tally::default();
                    self.round_start = Some(now);
                }
            }
        }
    }
}

/// Builds [`LossTolerant`] controllers: quinn's Cubic inside, with its default settings but
/// the initial window.
#[derive(Debug, Default)]
pub(crate) struct LossTolerantConfig {
    cubic: Arc<CubicConfig>,
}

impl LossTolerantConfig {
    /// Cubic's default settings, starting with a window of `bytes`.
    pub(crate) fn with_initial_window(bytes: u64) -> Self {
        let mut cubic = CubicConfig::default();
        cubic.initial_window(bytes);
        Self {
            cubic: Arc::new(cubic),
        }
    }
}

impl ControllerFactory for LossTolerantConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(LossTolerant {
            cubic: self.cubic.clone().build(now, current_mtu),
            judge: LossJudge::new(current_mtu),
        })
    }
}

/// Cubic, told of a loss only when [`LossJudge`] calls it congestion.
struct LossTolerant {
    cubic: Box<dyn Controller>,
    judge: LossJudge,
}

impl Controller for LossTolerant {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.cubic.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.judge.on_ack(now, sent, bytes, rtt.min(), rtt.get());
        self.cubic.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.cubic
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        let verdict = self.judge.judge(now, is_persistent_congestion, lost_bytes);
        tracing::debug!(
            lost_bytes,
            window = self.cubic.window(),
            rtt = ?self.judge.rtt,
            ?verdict,
            "packets lost"
        );
        if verdict.is_congestion() {
            self.cubic
                .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.judge.on_mtu_update(new_mtu);
        self.cubic.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.cubic.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.cubic.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(LossTolerant {
            cubic: self.cubic.clone_box(),
            judge: self.judge.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.cubic.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: u16 = 1452;
    const MS: Duration = Duration::from_millis(1);

    /// quinn sends an ack-eliciting packet only when a whole packet fits beside what is in
    /// flight, closes included (quinn issue #2785): on loopback, with a largest-size MTU probe
    /// out, the window must still hold one more largest-size packet, at the start and after
    /// the MTU grows to that size.
    #[test]
    fn a_loopback_window_holds_a_packet_beside_an_mtu_probe() {
        use super::super::{LOOPBACK_INITIAL_WINDOW, MAX_UDP_PAYLOAD};
        let config = Arc::new(LossTolerantConfig::with_initial_window(
            LOOPBACK_INITIAL_WINDOW,
        ));
        let mut c = config.build(start(), 1200);
        let room = |c: &dyn Controller| c.window() > 2 * u64::from(MAX_UDP_PAYLOAD);
        assert!(room(&*c), "window {} at the start", c.window());
        c.on_mtu_update(MAX_UDP_PAYLOAD);
        assert!(room(&*c), "window {} after the MTU grew", c.window());
    }

    /// A time with room before it for the send times of packets acknowledged at it.
    fn start() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    /// A judge that has seen `rounds` rounds of `per_round` acknowledged bytes at a 50 ms
    /// minimum round trip and the given smoothed one, without loss; and the time of its last
    /// acknowledgement, late in the last round.
    fn judge_after(rounds: u32, per_round: u64, srtt: Duration) -> (LossJudge, Instant) {
        let mut j = LossJudge::new(MTU);
        let mut now = start();
        for r in 0..rounds {
            // Ten acknowledgements spread over the round.
            for i in 0..10 {
                j.on_ack(now, now - srtt, per_round / 10, 50 * MS, srtt);
                if r + 1 < rounds || i < 9 {
                    now += srtt / 10;
                }
            }
        }
        (j, now)
    }

    #[test]
    fn a_loss_without_a_queue_at_a_low_rate_is_not_congestion() {
        // 100 Mbit/s at 50 ms: 625 kB a round; one 1452-byte packet lost is 0.2 %.
        let (mut j, now) = judge_after(4, 625_000, 51 * MS);
        assert!(!j.judge(now, false, 1452).is_congestion());
        // At 1 %: six packets in one round, as random loss on a bad link brings.
        let mut now = now;
        for _ in 0..6 {
            now += MS;
            assert!(!j.judge(now, false, 1452).is_congestion());
        }
    }

    #[test]
    fn a_loss_with_a_queue_is_congestion() {
        // Round trip 60 % over the minimum: a queue of 30 ms at 50 ms.
        let (mut j, now) = judge_after(4, 625_000, 80 * MS);
        assert_eq!(j.judge(now, false, 1452), Verdict::Queue { queue: 30 * MS });
        // Half over the minimum is no queue yet; just over is one.
        let (mut j, now) = judge_after(4, 625_000, 75 * MS);
        assert!(!j.judge(now, false, 1452).is_congestion());
        let (mut j, now) = judge_after(4, 625_000, 76 * MS);
        assert!(j.judge(now, false, 1452).is_congestion());
    }

    #[test]
    fn a_queue_draining_after_a_reduction_is_no_reason_for_another() {
        // The smoothed round trip still shows the queue an overshoot built (90 ms at 50 ms),
        // but the latest packets came back at 51 ms: the queue is gone.
        let (mut j, now) = judge_after(4, 625_000, 90 * MS);
        j.on_ack(now, now - 51 * MS, 1452, 50 * MS, 90 * MS);
        assert_eq!(j.judge(now, false, 1452), Verdict::Random);
    }

    #[test]
    fn one_late_acknowledgement_is_not_a_queue() {
        let (mut j, now) = judge_after(4, 625_000, 51 * MS);
        j.on_ack(now, now - 80 * MS, 1452, 50 * MS, 51 * MS);
        assert_eq!(j.judge(now, false, 1452), Verdict::Random);
    }

    #[test]
    fn the_latest_sample_is_the_newest_packet_of_a_batch() {
        let (mut j, now) = judge_after(4, 625_000, 90 * MS);
        // One batch, oldest packet first: 95 ms, then 52 ms: the latest is 52, no queue.
        let now = now + MS;
        j.on_ack(now, now - 95 * MS, 1452, 50 * MS, 90 * MS);
        j.on_ack(now, now - 52 * MS, 1452, 50 * MS, 90 * MS);
        assert_eq!(j.judge(now, false, 1452), Verdict::Random);
        // The next batch starts afresh: 85 ms and a smoothed 90 ms are a queue of 35 ms.
        let now = now + MS;
        j.on_ack(now, now - 85 * MS, 1452, 50 * MS, 90 * MS);
        assert_eq!(j.judge(now, false, 1452), Verdict::Queue { queue: 35 * MS });
    }

    #[test]
    fn on_a_short_path_the_queue_must_exceed_the_floor() {
        let mut j = LossJudge::new(MTU);
        let now = start();
        // 100 µs minimum: half of it would be 50 µs, the floor is 1 ms.
        j.on_ack(
            now,
            now - Duration::from_micros(900),
            10_000_000,
            Duration::from_micros(100),
            Duration::from_micros(900),
        );
        assert!(!j.judge(now, false, 1452).is_congestion());
        // A later batch (the same one would keep the smaller sample).
        let now = now + MS;
        j.on_ack(
            now,
            now - Duration::from_micros(1200),
            0,
            Duration::from_micros(100),
            Duration::from_micros(1200),
        );
        assert!(j.judge(now, false, 1452).is_congestion());
    }

    #[test]
    fn a_high_loss_rate_is_congestion_even_without_a_queue() {
        // A queue too short to show: 625 kB a round, and losses pass 4 % of two rounds.
        let (mut j, mut now) = judge_after(4, 625_000, 51 * MS);
        let mut lost = 0u64;
        let mut verdicts = Vec::new();
        while lost <= 2 * 625_000 / 25 + 2 * 1452 {
            now += MS / 10;
            lost += 1452;
            verdicts.push(j.judge(now, false, 1452).is_congestion());
        }
        assert!(!verdicts[0], "the first loss is not yet 4 %");
        assert!(*verdicts.last().unwrap(), "past 4 % it is congestion");
        let first = verdicts.iter().position(|&v| v).unwrap() as u64 + 1;
        // Two rounds of 625 kB plus the lost bytes, 4 % of it: 36 packets.
        assert!(
            (35..=37).contains(&first),
            "congestion after {first} losses"
        );
    }

    #[test]
    fn in_a_small_window_a_few_losses_count_against_the_minimum_sample() {
        // 20 packets a round: two lost would be 5 %, but the rate is judged over 512 packets'
        // worth, so it takes 21 (4.1 % of 512).
        let (mut j, mut now) = judge_after(3, 20 * 1452, 51 * MS);
        let verdicts: Vec<bool> = (0..21)
            .map(|_| {
                now += MS / 100;
                j.judge(now, false, 1452).is_congestion()
            })
            .collect();
        assert_eq!(verdicts.iter().position(|&v| v), Some(20));
    }

    #[test]
    fn losses_of_an_old_round_are_forgotten() {
        let (mut j, mut now) = judge_after(3, 20 * 1452, 51 * MS);
        for _ in 0..20 {
            now += MS / 100;
            assert!(!j.judge(now, false, 1452).is_congestion());
        }
        // Two rounds later the 20 are no longer counted: the 21st is one alone.
        for _ in 0..3 {
            j.on_ack(now, now - 51 * MS, 20 * 1452, 50 * MS, 51 * MS);
            now += 51 * MS;
        }
        assert!(!j.judge(now, false, 1452).is_congestion());
    }

    #[test]
    fn persistent_congestion_and_ecn_always_count() {
        let (mut j, now) = judge_after(4, 625_000, 51 * MS);
        assert_eq!(
            j.judge(now, true, 1452),
            Verdict::Persistent,
            "persistent congestion"
        );
        let (mut j, now) = judge_after(4, 625_000, 51 * MS);
        assert_eq!(j.judge(now, false, 0), Verdict::Ecn);
    }

    #[test]
    fn before_any_round_trip_is_known_a_loss_is_congestion() {
        let mut j = LossJudge::new(MTU);
        assert_eq!(j.judge(start(), false, 1452), Verdict::Unmeasured);
    }

    #[test]
    fn the_minimum_sample_follows_the_packet_size() {
        // 64 KiB packets (loopback): the sample is at least 512 of them, 32 MiB, so one lost
        // beside 100 kB acknowledged is well under 4 %.
        let mut j = LossJudge::new(MTU);
        let now = start();
        j.on_mtu_update(65_479);
        j.on_ack(now, now - 51 * MS, 100_000, 50 * MS, 51 * MS);
        assert!(!j.judge(now, false, 65_479).is_congestion());
        // 1452-byte packets: 512 of them is 743 kB, and the 21st loss passes 4 % of that.
        let mut j = LossJudge::new(MTU);
        j.on_ack(now, now - 51 * MS, 100_000, 50 * MS, 51 * MS);
        for _ in 0..20 {
            assert!(!j.judge(now, false, 1452).is_congestion());
        }
        assert!(j.judge(now, false, 1452).is_congestion());
    }
}
