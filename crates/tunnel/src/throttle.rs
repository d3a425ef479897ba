//! Log lines a stranger can cause at will (failed authentications, refused or evicted
//! connections): one per [`LOG_EVERY`] and site, saying how many like it were left out, so a
//! flood cannot fill the disk or bury the lines that matter.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shortest gap between two lines of one site.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);

/// One log site's budget.
pub(crate) struct Throttle(Mutex<(Option<Instant>, u64)>);

impl Throttle {
    pub(crate) const fn new() -> Self {
        Throttle(Mutex::new((None, 0)))
    }

    /// `Some(left_out)` when this event may be logged.
    pub(crate) fn pass(&self) -> Option<u64> {
        self.pass_at(Instant::now())
    }

    fn pass_at(&self, now: Instant) -> Option<u64> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match g.0 {
            Some(last) if now.duration_since(last) < LOG_EVERY => {
                g.1 += 1;
                None
            }
            _ => {
                let left_out = g.1;
                *g = (Some(now), 0);
                Some(left_out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
