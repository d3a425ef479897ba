//! A spare thread for direct-mode connections accepted while the accepting thread is busy.
//!
//! forward runs its connections on one thread by default: a relay is bound by the network, and
//! one thread saves the cross-thread wakeups that a work-stealing runtime pays on every message
//! (`--threads 2` cost 16 % on idle round trips and 29 % on connect + first byte, session 21).
//! But a 1-byte round trip beside a download through the same process then waits for the thread
//! the download keeps busy: 0.8–1.9 ms p50 on loopback where stunnel, a thread per connection,
//! answered in 0.14 ms (session 22).
//!
//! So a connection accepted while its thread has used more than a quarter of a core over the
//! last [`SAMPLE_EVERY`] is handed, before it carries a byte, to a second thread with a runtime
//! of its own, and lives there entirely: no wakeup crosses threads for it afterwards. A
//! connection accepted while the thread is quiet stays, as before. Only connections whose
//! remote end needs nothing of the accepting thread move (direct mode: a TCP + TLS connection
//! of its own); a mux stream would wake its carrier's tasks on the other thread for every
//! message.
//!
//! Linux only: the thread's CPU time comes from `/proc/thread-self/schedstat`; where that cannot
//! be read, nothing moves.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

/// CPU use is judged over at least this long; accepts in between reuse the last verdict.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// The spare thread, started when the first connection moves.
#[derive(Default)]
pub struct Spare {
    handle: OnceLock<Option<Handle>>,
}

impl Spare {
    /// A spare thread not started yet.
    pub fn new() -> Spare {
        Spare::default()
    }

    /// The spare thread's runtime, started on first use; `None` if it could not be started
    /// (the connection then stays where it was accepted).
    pub fn handle(&self) -> Option<&Handle> {
        self.handle
            .get_or_init(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .event_interval(crate::relay::EVENT_INTERVAL)
                    .build()
                    .map_err(|e| tracing::debug!(error = %e, "cannot build the spare runtime"))
                    .ok()?;
                let handle = rt.handle().clone();
                std::thread::Builder::new()
                    .name("forward-spare".into())
                    .spawn(move || rt.block_on(std::future::pending::<()>()))
                    .map_err(|e| tracing::debug!(error = %e, "cannot start the spare thread"))
                    .ok()?;
                Some(handle)
            })
            .as_ref()
    }
}

/// One reading of a thread's clock: when, and its CPU time then.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sample {
    pub at: Instant,
    pub cpu: Duration,
}

/// What the last judgement saw, per accepting thread.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Judged {
    pub last: Option<Sample>,
    pub busy: bool,
}

/// Busy means more than a quarter of a core since the last sample, once [`SAMPLE_EVERY`] has
/// passed; until then the last verdict stands and the clock is not read (`cpu` is called only
/// for a new sample: reading it is a file read). The first sample has nothing to compare with:
/// quiet. A clock that cannot be read counts as quiet and keeps the last sample. A quarter, not
/// a half: a relay's thread at a third of a core (a debug build's transfer, paced by its peers)
/// already keeps a newcomer's first bytes waiting behind its batches, and an interactive or
/// idle thread uses a few percent.
pub(crate) fn judge(prev: Judged, at: Instant, cpu: impl FnOnce() -> Option<Duration>) -> Judged {
    if let Some(last) = prev.last {
        if at.saturating_duration_since(last.at) < SAMPLE_EVERY {
            return prev;
        }
    }
    let Some(cpu) = cpu() else {
        return Judged {
            busy: false,
            ..prev
        };
    };
    let now = Sample { at, cpu };
    Judged {
        last: Some(now),
        busy: prev
            .last
            .is_some_and(|last| now.cpu.saturating_sub(last.cpu) * 4 > now.at - last.at),
    }
}

/// Whether the calling thread has been busy lately (see [`judge`]).
pub(crate) fn this_thread_busy() -> bool {
    thread_local! {
        static STATE: Cell<Judged> = const { Cell::new(Judged { last: None, busy: false }) };
    }
    STATE.with(|s| {
        let next = judge(s.get(), Instant::now(), thread_cpu);
        s.set(next);
        next.busy
    })
}

/// The calling thread's CPU time so far (the first field of schedstat, in nanoseconds).
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn cpu(ms: u64) -> impl FnOnce() -> Option<Duration> {
        move || Some(Duration::from_millis(ms))
    }

    /// A thread that used all of the 50 ms since its first sample at `t`.
    fn busy_at_50ms(t: Instant) -> Judged {
        judge(
            judge(Judged::default(), ms(t, 0), cpu(0)),
            ms(t, 50),
            cpu(50),
        )
    }

    #[test]
    fn the_first_sample_is_quiet_and_later_ones_compare_cpu_with_wall_time() {
        let t = Instant::now();
        let first = judge(Judged::default(), ms(t, 0), cpu(10));
        assert!(!first.busy);
        // 20 ms of CPU in 60 ms: a third of a core.
        let busy = judge(first, ms(t, 60), cpu(30));
        assert!(busy.busy);
        // 10 ms of CPU in the next 60 ms: a sixth.
        let quiet = judge(busy, ms(t, 120), cpu(40));
        assert!(!quiet.busy);
    }

    #[test]
    fn within_the_sample_period_the_last_verdict_stands_and_the_clock_is_not_read() {
        let t = Instant::now();
        let busy = busy_at_50ms(t);
        assert!(busy.busy);
        // 10 ms later: still busy, the sample is not replaced, and the clock is left alone.
        let unread = || -> Option<Duration> { panic!("the clock was read within the period") };
        assert_eq!(judge(busy, ms(t, 60), unread), busy);
    }

    #[test]
    fn an_unreadable_clock_is_quiet_and_keeps_the_last_sample() {
        let t = Instant::now();
        let busy = busy_at_50ms(t);
        let blind = judge(busy, ms(t, 200), || None);
        assert_eq!(
            blind,
            Judged {
                busy: false,
                ..busy
            }
        );
    }

    #[test]
    fn the_thread_clock_counts_this_threads_cpu() {
        let Some(before) = thread_cpu() else {
            return; // not Linux: nothing moves, nothing to read
        };
        let end = Instant::now() + Duration::from_millis(30);
        while Instant::now() < end {
            std::hint::black_box(0u64);
        }
        let after = thread_cpu().expect("read once, readable again");
        assert!(
            after > before,
            "30 ms of spinning left the clock at {after:?}"
        );
    }
}
