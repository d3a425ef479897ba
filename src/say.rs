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

/// Writes one line to stderr, for the last word before exit. A closed stderr
/// (`forward ... 2>&1 | head`, a log reader that died) must not turn an exit status of 1 or 2
/// into a panic's 101, as `eprintln!` does: a failed write is dropped (there is nowhere left
/// to say it).
pub fn err_line(args: std::fmt::Arguments<'_>) {
    let text = args.to_string();
    let mut err = std::io::stderr().lock();
    let _ = err
        .write_all(escape_controls(&text).as_bytes())
        .and_then(|()| err.write_all(b"\n"));
}

/// `s` with every control character escaped as Rust writes it (`\n`, `\t`, `\u{1b}`): an
/// error or a `forwarding` line stays one line when it quotes what a user typed (a SPEC, a
/// `--ca-file` or socket path with a newline split them over several, a tester's finding).
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    use forward_tunnel::policy::is_deceptive;
    if !s.chars().any(is_deceptive) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if is_deceptive(c) {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// `eprintln!` that never panics: see [`err_line`].
macro_rules! say_err {
    ($($arg:tt)*) => {
        $crate::say::err_line(format_args!($($arg)*))
    };
}
pub(crate) use say_err;

/// `println!` for start-up lines: see [`line`].
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say::line(format_args!($($arg)*))
    };
}
pub(crate) use say;
