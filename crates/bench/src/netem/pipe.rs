//! One direction of the emulated link, sans-IO: packets go in with the time they arrived and
//! come out when they are due. No sockets, no clock: the caller passes the time in, so the
//! schedule is tested with made-up instants.
//!
//! ```text
//!  push(now, pkt) ─► loss? ─► drop-tail queue ─► serialiser (rate) ─► propagation (one-way delay) ─► pop_due(now)
//! ```
//!
//! The model is one bottleneck link: a transmitter that sends one packet at a time at the
//! given rate, fed by a FIFO queue bounded in bytes (tail drop), followed by a wire with a
//! fixed one-way delay that loses packets at random. Because the rate and the delay are
//! constant, due times only grow and a FIFO is the whole scheduler: no reordering.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;

/// What one direction of the link does to packets.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LinkParams {
    /// Propagation delay, added after serialisation.
    pub one_way: Duration,
    /// Bottleneck rate; `None` sends every packet at once (no queue ever builds).
    pub bytes_per_sec: Option<f64>,
    /// Probability that a packet is lost on the wire (after it was serialised).
    pub loss: f64,
    /// Bytes the queue in front of the transmitter may hold (the packet being sent included).
    pub queue_bytes: usize,
}

/// What happened to a pushed packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It will come out of [`Pipe::pop_due`] at this time.
    Queued(Instant),
    /// Serialised, then lost on the wire.
    Lost,
    /// The queue was full: dropped at the tail.
    QueueFull,
}

/// Counters for one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct PipeStats {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Lost on the wire (random loss).
    pub lost: u64,
    /// Dropped because the queue was full.
    pub queue_drops: u64,
    /// The most bytes that were ever waiting for the transmitter.
    pub max_backlog_bytes: u64,
}

pub struct Pipe<R> {
    params: LinkParams,
    rng: R,
    /// When the transmitter finishes the last packet it accepted.
    link_free: Option<Instant>,
    queue: VecDeque<(Instant, Vec<u8>)>,
    stats: PipeStats,
}

impl<R: Rng> Pipe<R> {
    pub fn new(params: LinkParams, rng: R) -> Pipe<R> {
        Pipe {
            params,
            rng,
            link_free: None,
            queue: VecDeque::new(),
            stats: PipeStats::default(),
        }
    }

    pub fn stats(&self) -> PipeStats {
        self.stats
    }

    /// Bytes not yet serialised at `now`: the remaining transmit time times the rate.
    pub fn backlog_bytes(&self, now: Instant) -> f64 {
        match (self.params.bytes_per_sec, self.link_free) {
            (Some(rate), Some(free)) if free > now => free.duration_since(now).as_secs_f64() * rate,
            _ => 0.0,
        }
    }

    /// A packet arrives at the link at `now`.
    pub fn push(&mut self, now: Instant, packet: Vec<u8>) -> Verdict {
        let len = packet.len();
        self.stats.packets_in += 1;
        self.stats.bytes_in += len as u64;
        let mut sent = now;
        if let Some(rate) = self.params.bytes_per_sec {
            let backlog = self.backlog_bytes(now);
            // Rounding must not turn a queue that is exactly full into one that is not.
            if backlog + len as f64 > self.params.queue_bytes as f64 + 1e-6 {
                self.stats.queue_drops += 1;
                return Verdict::QueueFull;
            }
            self.stats.max_backlog_bytes = self
                .stats
                .max_backlog_bytes
                .max((backlog + len as f64) as u64);
            let start = self.link_free.map_or(now, |free| free.max(now));
            sent = start + Duration::from_secs_f64(len as f64 / rate);
            self.link_free = Some(sent);
        }
        if self.params.loss > 0.0 && self.rng.gen_bool(self.params.loss.min(1.0)) {
            self.stats.lost += 1;
            return Verdict::Lost;
        }
        let due = sent + self.params.one_way;
        self.queue.push_back((due, packet));
        Verdict::Queued(due)
    }

    /// When the next packet is due, if any is in flight.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|(due, _)| *due)
    }

    /// The next packet whose time has come.
    pub fn pop_due(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.next_due()? > now {
            return None;
        }
        let (_, packet) = self.queue.pop_front()?;
        self.stats.packets_out += 1;
        self.stats.bytes_out += packet.len() as u64;
        Some(packet)
    }

    /// Packets in flight (queued or on the wire).
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn params(one_way_ms: u64, rate: Option<f64>, loss: f64, queue: usize) -> LinkParams {
        LinkParams {
            one_way: Duration::from_millis(one_way_ms),
            bytes_per_sec: rate,
            loss,
            queue_bytes: queue,
        }
    }

    fn pipe(p: LinkParams) -> Pipe<StdRng> {
        Pipe::new(p, StdRng::seed_from_u64(7))
    }

    fn pkt(tag: u8, len: usize) -> Vec<u8> {
        vec![tag; len]
    }

    #[test]
    fn delay_only_holds_each_packet_for_the_one_way_delay() {
        let mut p = pipe(params(25, None, 0.0, 0));
        let t0 = Instant::now();
        assert_eq!(
            p.push(t0, pkt(1, 100)),
            Verdict::Queued(t0 + Duration::from_millis(25))
        );
        let t1 = t0 + Duration::from_millis(3);
        p.push(t1, pkt(2, 100));
        assert_eq!(p.pop_due(t0 + Duration::from_millis(24)), None);
        assert_eq!(p.next_due(), Some(t0 + Duration::from_millis(25)));
        assert_eq!(p.pop_due(t0 + Duration::from_millis(25)), Some(pkt(1, 100)));
        assert_eq!(p.pop_due(t0 + Duration::from_millis(27)), None);
        assert_eq!(p.pop_due(t1 + Duration::from_millis(25)), Some(pkt(2, 100)));
        assert_eq!(p.next_due(), None);
        assert_eq!(p.stats().packets_out, 2);
        assert_eq!(p.stats().bytes_out, 200);
    }

    #[test]
    fn packets_are_serialised_one_after_another_at_the_rate() {
        // 1 MB/s: a 1000-byte packet takes 1 ms on the wire.
        let mut p = pipe(params(10, Some(1e6), 0.0, 1 << 20));
        let t0 = Instant::now();
        for k in 0..5u64 {
            let Verdict::Queued(due) = p.push(t0, pkt(k as u8, 1000)) else {
                panic!("packet {k} not queued");
            };
            let want = t0 + Duration::from_millis(10 + k + 1);
            let diff = if due > want { due - want } else { want - due };
            assert!(diff < Duration::from_micros(1), "packet {k}: {diff:?} off");
        }
        // An idle link starts the next packet when it arrives, not when the last one ended.
        let later = t0 + Duration::from_millis(100);
        let Verdict::Queued(due) = p.push(later, pkt(9, 1000)) else {
            panic!("not queued");
        };
        assert!(due.duration_since(later) - Duration::from_millis(11) < Duration::from_micros(1));
        // FIFO: everything comes out in the order it went in.
        let order: Vec<u8> = std::iter::from_fn(|| p.pop_due(later + Duration::from_secs(1)))
            .map(|b| b[0])
            .collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4, 9]);
    }

    #[test]
    fn a_full_queue_drops_at_the_tail_and_drains_at_the_rate() {
        // 1 MB/s with room for 10 packets of 1000 bytes.
        let mut p = pipe(params(5, Some(1e6), 0.0, 10_000));
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..15).map(|_| p.push(t0, pkt(0, 1000))).collect();
        assert!(verdicts[..10]
            .iter()
            .all(|v| matches!(v, Verdict::Queued(_))));
        assert!(verdicts[10..].iter().all(|v| *v == Verdict::QueueFull));
        assert_eq!(p.stats().queue_drops, 5);
        assert_eq!(p.stats().max_backlog_bytes, 10_000);
        // 3.5 ms later three and a half packets have left the queue: three fit again.
        let t1 = t0 + Duration::from_micros(3500);
        assert!((p.backlog_bytes(t1) - 6500.0).abs() < 1.0);
        let more: Vec<Verdict> = (0..4).map(|_| p.push(t1, pkt(0, 1000))).collect();
        assert_eq!(
            more.iter()
                .filter(|v| matches!(v, Verdict::Queued(_)))
                .count(),
            3
        );
        assert_eq!(more[3], Verdict::QueueFull);
    }

    #[test]
    fn a_saturated_link_delivers_at_its_rate() {
        // Offer 2 MB/s to a 1 MB/s link for one simulated second: about 1 MB comes out.
        let mut p = pipe(params(20, Some(1e6), 0.0, 50_000));
        let t0 = Instant::now();
        let mut out = 0usize;
        for us in (0..1_000_000u64).step_by(500) {
            let now = t0 + Duration::from_micros(us);
            p.push(now, pkt(0, 1000));
            while let Some(b) = p.pop_due(now) {
                out += b.len();
            }
        }
        // The first 20 ms are propagation, so 0.98 s of sending has arrived.
        assert!((975_000..=985_000).contains(&out), "{out} bytes");
        assert!(p.stats().queue_drops > 900, "{:?}", p.stats());
    }

    #[test]
    fn random_loss_hits_about_the_configured_share() {
        let mut p = pipe(params(1, None, 0.01, 0));
        let t0 = Instant::now();
        for _ in 0..100_000 {
            p.push(t0, pkt(0, 60));
        }
        let lost = p.stats().lost;
        assert!((800..=1200).contains(&lost), "{lost} of 100000 lost");
        assert_eq!(p.in_flight() as u64 + lost, 100_000);
    }

    #[test]
    fn loss_extremes() {
        let t0 = Instant::now();
        let mut all = pipe(params(1, Some(1e6), 1.0, 1 << 20));
        assert!((0..100).all(|_| all.push(t0, pkt(0, 100)) == Verdict::Lost));
        // A lost packet still used its time on the wire.
        assert!(all.backlog_bytes(t0) > 9_000.0);
        let mut none = pipe(params(1, None, 0.0, 0));
        assert!((0..100).all(|_| matches!(none.push(t0, pkt(0, 100)), Verdict::Queued(_))));
    }
}
