//! The start-up lines on stdout (where each forward listens, the agent's pin, the demo's
//! report).

use std::io::Write;

/// Writes one line to stdout. The lines are a report, not the job: a reader that went away
/// (`forward 0:vm:5432 | head -1`, the README's way to learn the picked port) must not stop
/// the forwards or panic, as `println!` does on a closed pipe. So a failed write is dropped,
/// and said at debug level.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let res = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    if let Err(e) = res {
        tracing::debug!(error = %e, "stdout is not writable: a start-up line was dropped");
    }
}

/// `println!` for start-up lines: see [`line`].
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say::line(format_args!($($arg)*))
    };
}
pub(crate) use say;
