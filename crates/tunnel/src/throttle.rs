//! Log lines a stranger can cause at will (failed authentications, refused or evicted
//! connections): one per [`LOG_EVERY`] and site, saying how many like it were left out, so a
//! flood cannot fill the disk or bury the lines that matter.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shortest gap between two lines of one site.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);

/// One log site's budget.
pub(crate) struct Throttle(Mutex<Budget>);

impl Throttle {
    pub(crate) const fn new() -> Self {
        Throttle(Mutex::new(Budget::new()))
    }

    /// `Some(left_out)` when this event may be logged.
    pub(crate) fn pass(&self) -> Option<u64> {
        self.pass_at(Instant::now())
    }

    fn pass_at(&self, now: Instant) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pass_at(now)
    }
}

/// When a line last went out, and how many like it were left out since.
struct Budget {
    last: Option<Instant>,
    left_out: u64,
}

impl Budget {
    const fn new() -> Self {
        Budget {
            last: None,
            left_out: 0,
        }
    }

    /// `Some(left_out)` when a line may go out at `now` (the first always may).
    fn pass_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < LOG_EVERY => {
                self.left_out += 1;
                None
            }
            _ => {
                let left_out = self.left_out;
                *self = Budget {
                    last: Some(now),
                    left_out: 0,
                };
                Some(left_out)
            }
        }
    }
}

/// The same line over and over (every connection of a forward failing for one reason while
/// the agent is down: 1,180 identical lines a minute for a client retrying 20 times a second,
/// in a review): once per [`LOG_EVERY`], with how many were left out; a different line passes
/// at once. The last few different lines are each remembered: a failure is often reported two
/// ways in turn (the attempt's own error, then "the last attempt failed moments ago: ..." for
/// the connections that share it), and remembering one line let both through every time.
/// What a repeat leaves out is the timestamp and the peer, which the debug log keeps.
pub(crate) struct Repeats(Mutex<VecDeque<(String, Budget)>>);

/// Different lines [`Repeats`] remembers at once.
const LINES_KEPT: usize = 4;

impl Repeats {
    pub(crate) const fn new() -> Self {
        Repeats(Mutex::new(VecDeque::new()))
    }

    /// `Some(left_out)` when `line` may be logged: how many identical lines were left out
    /// since it was last logged.
    pub(crate) fn pass(&self, line: &str) -> Option<u64> {
        self.pass_at(line, Instant::now())
    }

    fn pass_at(&self, line: &str, now: Instant) -> Option<u64> {
        let mut lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, budget)) = lines.iter_mut().find(|(l, _)| l == line) {
            return budget.pass_at(now);
        }
        if lines.len() == LINES_KEPT {
            lines.pop_back();
        }
        lines.push_front((line.to_owned(), Budget::new()));
        lines[0].1.pass_at(now)
    }

    /// How many repeats of `line` are left out so far, uncounted.
    pub(crate) fn left_out(&self, line: &str) -> u64 {
        let lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter()
            .find(|(l, _)| l == line)
            .map_or(0, |(_, budget)| budget.left_out)
    }

    /// How many repeats of `line` were left out since it was last logged or counted here; the
    /// count starts over, the interval does not.
    pub(crate) fn take_left_out(&self, line: &str) -> u64 {
        let mut lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter_mut()
            .find(|(l, _)| l == line)
            .map_or(0, |(_, budget)| std::mem::take(&mut budget.left_out))
    }

    /// Every line with repeats left out, and how many; the counts start over.
    pub(crate) fn take_all_left_out(&self) -> Vec<(String, u64)> {
        let mut lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter_mut()
            .filter(|(_, b)| b.left_out > 0)
            .map(|(l, b)| (l.clone(), std::mem::take(&mut b.left_out)))
            .collect()
    }
}

/// The failed reconnect attempts of one outage, for its log: attempts 1, 2, 4, 8, ... and any
/// whose reason differs from the last one warned of are warnings, the rest debug lines. An
/// outage of hours would otherwise write a warning every backoff; a new reason (the agent is
/// back, with another token) is worth one at once.
#[derive(Default)]
pub(crate) struct Attempts {
    attempt: u32,
    last_warned: String,
}

impl Attempts {
    /// Counts a failed attempt. `Some(next)`: warn of it, saying the next warning comes at
    /// attempt `next` (or with a new reason); `None`: a debug line.
    pub(crate) fn failed(&mut self, reason: &str) -> Option<u32> {
        self.attempt = self.attempt.saturating_add(1);
        if self.attempt.is_power_of_two() || reason != self.last_warned {
            self.last_warned = reason.to_owned();
            Some(self.attempt.saturating_add(1).next_power_of_two())
        } else {
            None
        }
    }

    /// The attempts counted so far.
    pub(crate) fn count(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_of_one_line_pass_once_per_interval_and_a_new_line_at_once() {
        let r = Repeats::new();
        let t0 = Instant::now();
        assert_eq!(r.pass_at("down", t0), Some(0));
        for i in 1..=100 {
            assert_eq!(r.pass_at("down", t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(r.pass_at("other", t0 + Duration::from_millis(200)), Some(0));
        assert_eq!(r.pass_at("down", t0 + LOG_EVERY * 2), Some(100));
    }

    /// One failure told two ways in turn passes once per interval each, not every time.
    #[test]
    fn lines_that_take_turns_are_each_held_back() {
        let r = Repeats::new();
        let t0 = Instant::now();
        let (a, b) = ("refused", "the last attempt failed moments ago: refused");
        assert_eq!(r.pass_at(a, t0), Some(0));
        assert_eq!(r.pass_at(b, t0), Some(0));
        for i in 1..=10 {
            let t = t0 + Duration::from_millis(i * 100);
            assert_eq!(r.pass_at(a, t), None);
            assert_eq!(r.pass_at(b, t), None);
        }
        assert_eq!(r.pass_at(a, t0 + LOG_EVERY), Some(10));
        // Four other lines push both out of memory: each passes again at once.
        for other in ["1", "2", "3", "4"] {
            assert_eq!(r.pass_at(other, t0 + LOG_EVERY), Some(0));
        }
        assert_eq!(r.pass_at(b, t0 + LOG_EVERY), Some(0));
    }

    /// What was left out can be counted before the next line passes (at the end of the
    /// interval, at exit): counted once, and the interval holds.
    #[test]
    fn left_out_repeats_are_counted_once() {
        let r = Repeats::new();
        let t0 = Instant::now();
        assert_eq!(r.pass_at("down", t0), Some(0));
        assert_eq!(r.pass_at("other", t0), Some(0));
        for i in 1..=7 {
            assert_eq!(r.pass_at("down", t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(r.pass_at("other", t0 + Duration::from_millis(9)), None);
        assert_eq!(r.take_left_out("down"), 7);
        assert_eq!(r.take_left_out("down"), 0);
        assert_eq!(r.take_left_out("never seen"), 0);
        assert_eq!(r.pass_at("down", t0 + Duration::from_secs(1)), None);
        let mut all = r.take_all_left_out();
        all.sort();
        assert_eq!(all, vec![("down".to_owned(), 1), ("other".to_owned(), 1)]);
        assert!(r.take_all_left_out().is_empty());
        assert_eq!(r.pass_at("down", t0 + LOG_EVERY), Some(0));
    }

    #[test]
    fn reconnect_attempts_are_warned_at_powers_of_two_and_new_reasons() {
        let mut a = Attempts::default();
        let warned: Vec<(u32, Option<u32>)> = (1..=9)
            .map(|_| {
                let w = a.failed("refused");
                (a.count(), w)
            })
            .filter(|(_, w)| w.is_some())
            .collect();
        assert_eq!(
            warned,
            vec![(1, Some(2)), (2, Some(4)), (4, Some(8)), (8, Some(16))]
        );
        assert_eq!(a.failed("auth rejected"), Some(16), "a new reason");
        assert_eq!(a.failed("auth rejected"), None);
    }

    #[test]
    fn one_line_per_interval_counting_what_was_left_out() {
        let t = Throttle::new();
        let t0 = Instant::now();
        assert_eq!(t.pass_at(t0), Some(0));
        for i in 1..=500 {
            assert_eq!(t.pass_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(t.pass_at(t0 + LOG_EVERY), Some(500));
        assert_eq!(t.pass_at(t0 + LOG_EVERY + Duration::from_secs(1)), None);
        assert_eq!(t.pass_at(t0 + LOG_EVERY * 3), Some(1));
    }
}
