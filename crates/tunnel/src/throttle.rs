//! Log lines a stranger can cause at will (failed authentications, refused or evicted
//! connections): one per [`LOG_EVERY`] and site, saying how many like it were left out, so a
//! flood cannot fill the disk or bury the lines that matter.

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
/// at once. What a repeat leaves out is the timestamp and the peer, which the debug log keeps.
pub(crate) struct Repeats(Mutex<Option<(String, Budget)>>);

impl Repeats {
    pub(crate) const fn new() -> Self {
        Repeats(Mutex::new(None))
    }

    /// `Some(left_out)` when `line` may be logged: how many identical lines were left out
    /// since it was last logged.
    pub(crate) fn pass(&self, line: &str) -> Option<u64> {
        self.pass_at(line, Instant::now())
    }

    fn pass_at(&self, line: &str, now: Instant) -> Option<u64> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            Some((last, budget)) if last == line => budget.pass_at(now),
            _ => g.insert((line.to_owned(), Budget::new())).1.pass_at(now),
        }
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
        assert_eq!(r.pass_at("down", t0 + Duration::from_millis(300)), Some(0));
        assert_eq!(r.pass_at("down", t0 + Duration::from_millis(400)), None);
        assert_eq!(r.pass_at("down", t0 + LOG_EVERY * 2), Some(1));
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
