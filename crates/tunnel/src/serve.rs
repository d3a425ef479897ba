//! The accept loop of one forward: every accepted local connection gets its own task that opens
//! a remote stream through the forward's [`Connector`] and relays until both directions end.
//!
//! ```text
//! Listener ──accept──► task: Connector::connect ──► relay(local, remote) ──► log outcome
//!     ▲ stop (SIGINT/SIGTERM): no more accepts        ▲ abort (grace over): reset the local side
//! ```
//!
//! A failing connection is logged with its forward and never disturbs the others.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::dial::Connector;
use crate::listen::{Listener, LocalStream};
use crate::relay::{relay, Direction, Endpoint, RelayError};
use crate::spare::{self, Spare};
use crate::throttle::Repeats;

/// Shared lifecycle of all forwards of a process.
#[derive(Clone, Default)]
pub struct Lifecycle {
    /// Cancelled on SIGINT/SIGTERM: listeners stop accepting.
    pub stop: CancellationToken,
    /// Cancelled when the grace period is over: open connections are reset.
    pub abort: CancellationToken,
    /// Tracks open connections so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Where a connection accepted while its thread is busy goes ([`crate::spare`]); `None`
    /// keeps every connection on the thread that accepted it (a multi-thread runtime spreads
    /// them itself).
    pub spare: Option<Arc<Spare>>,
}

impl Lifecycle {
    /// Stops accepting, waits up to `grace` for open connections, then resets the rest.
    /// Returns how many connections had to be reset.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.stop.cancel();
        self.tracker.close();
        // Said only if they do not finish at once: one still winding down as we stop (the
        // demo's self-check, a client that just closed) would read as something left open.
        let moment = grace.min(Duration::from_millis(200));
        if tokio::time::timeout(moment, self.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let open = self.tracker.len();
        if open > 0 && !grace.is_zero() {
            tracing::info!(open, ?grace, "waiting for open connections to finish");
        }
        if tokio::time::timeout(grace - moment, self.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.tracker.len();
        if !grace.is_zero() {
            tracing::warn!(left, "grace period over, resetting connections still open");
        }
        self.abort.cancel();
        self.tracker.wait().await;
        left
    }
}

/// Runs the accept loop of one forward until `life.stop` is cancelled.
pub async fn serve<C: Connector>(
    listener: Listener,
    connector: Arc<C>,
    label: Arc<str>,
    life: Lifecycle,
) {
    let failures = Arc::new(Failures {
        repeats: Repeats::new(),
        label: label.clone(),
    });
    loop {
        let accepted = tokio::select! {
            _ = life.stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let span = tracing::debug_span!("conn", forward = %label, %peer);
                let conn = {
                    let (connector, label, life, failures) = (
                        connector.clone(),
                        label.clone(),
                        life.clone(),
                        failures.clone(),
                    );
                    move |stream| handle(stream, connector, label, life, failures)
                };
                let spare = life
                    .spare
                    .as_ref()
                    .filter(|_| connector.movable() && spare::this_thread_busy())
                    .and_then(|s| s.handle());
                let Some(spare) = spare else {
                    life.tracker.spawn(conn(stream).instrument(span));
                    continue;
                };
                let detached = match stream.detach() {
                    Ok(d) => d,
                    Err(e) => {
                        // Taken off this runtime but not usable elsewhere: it is closed.
                        tracing::warn!(forward = %label, %peer, error = %e, "could not move a new connection to the spare thread");
                        continue;
                    }
                };
                // The span is at debug level: the warning names the forward itself.
                let label = label.clone();
                life.tracker.spawn_on(
                    async move {
                        match detached.attach() {
                            Ok(stream) => {
                                tracing::debug!("moved to the spare thread: this one is busy");
                                conn(stream).await
                            }
                            Err(e) => tracing::warn!(
                                forward = %label,
                                error = %e,
                                "could not take over a new connection on the spare thread"
                            ),
                        }
                    }
                    .instrument(span),
                    spare,
                );
            }
            Err(e) => {
                // Out of descriptors or a connection that died in the backlog: keep serving,
                // but do not spin, and do not write a line per attempt (out of descriptors,
                // 60 waiting connections wrote 585 in 30 s).
                if let Some(more) = ACCEPT_FAILURES.pass() {
                    let hint = crate::limits::out_of_files_suffix(&e, ": ");
                    tracing::warn!(forward = %label, error = %e, not_logged = more, "accept failed{hint}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!(forward = %label, "listener closed");
}

/// A relay error between a local side (`a`, named `local`) and a connector's remote (`b`),
/// for the log line or `forward stdio`'s error: when the remote hung up before its first byte,
/// and within [`HANG_UP_HINT_WITHIN`] of the relay's start (`lasted`), the connector's hint
/// says what is likely missing (nothing listening on the VM's port). A connection that ran for
/// longer was reached: an upload to a service that answers only at the end, cut by an edge
/// or service dying, had been pointed at a bind problem.
///
/// `local_unix`: the local side is a Unix socket, which has no reset; the line says it was
/// closed (its client sees an end of stream), where it used to say both sides were reset (a
/// tester's finding).
pub fn explain<C: Connector>(
    e: &RelayError,
    local: &str,
    local_unix: bool,
    connector: &C,
    lasted: Duration,
) -> String {
    let text = if local_unix {
        e.describe_ending(
            local,
            "remote",
            "; the remote side reset, the local Unix socket closed (it has no reset: its client \
             sees an end of stream)",
        )
    } else {
        e.describe(local, "remote")
    };
    // Reading from it or writing to it: both are how an edge's hang-up shows.
    let remote_failed = matches!(
        (e, e.direction()),
        (RelayError::Read { .. }, Direction::BToA) | (RelayError::Write { .. }, Direction::AToB)
    );
    match connector.hint_no_answer() {
        Some(hint) if remote_failed && e.stats().b_to_a == 0 && lasted < HANG_UP_HINT_WITHIN => {
            format!("{text}; it hung up before any reply: {hint}")
        }
        _ => text,
    }
}

/// An edge with nothing behind the port hangs up right after the handshake.
pub const HANG_UP_HINT_WITHIN: Duration = Duration::from_secs(1);

static ACCEPT_FAILURES: crate::throttle::Throttle = crate::throttle::Throttle::new();

/// One forward's failed connections, logged through [`Repeats`]. What it leaves out is
/// counted in a line of its own at the end of the interval, or when the forward's last
/// connection has ended (exit), if no line of the same cause has counted it by then: a burst
/// of failures followed by silence was one line, its repeats never mentioned.
struct Failures {
    repeats: Repeats,
    label: Arc<str>,
}

impl Failures {
    /// After a line was left out: count it at the end of the interval, unless a line of the
    /// same cause does so first. One timer per interval and cause, started by the first
    /// repeat left out.
    fn count_later(self: &Arc<Self>, cause: &str) {
        if self.repeats.left_out(cause) != 1 {
            return;
        }
        let (me, cause) = (Arc::downgrade(self), cause.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(crate::throttle::LOG_EVERY).await;
            if let Some(me) = me.upgrade() {
                me.report(&cause, me.repeats.take_left_out(&cause));
            }
        });
    }

    fn report(&self, cause: &str, more: u64) {
        if more > 0 {
            tracing::warn!(
                forward = %self.label,
                not_logged = more,
                "{more} more connection(s) failed the same way in the last {}s: {cause}",
                crate::throttle::LOG_EVERY.as_secs()
            );
        }
    }
}

impl Drop for Failures {
    fn drop(&mut self) {
        for (cause, more) in self.repeats.take_all_left_out() {
            self.report(&cause, more);
        }
    }
}

/// How long a connection still dialling when forward is told to stop may go on dialling. The
/// grace period is for connections that carry bytes: one whose dial hangs (an edge that does
/// not answer, an agent being reconnected) held Ctrl-C for the whole grace, 10 s by default,
/// with nothing of the user's to finish. A healthy dial completes well within this and is then
/// relayed under the grace like any other.
pub const DIAL_AT_STOP: Duration = Duration::from_secs(2);

async fn handle<C: Connector>(
    local: LocalStream,
    connector: Arc<C>,
    label: Arc<str>,
    life: Lifecycle,
    failures: Arc<Failures>,
) {
    let abort = life.abort;
    let killed = Arc::new(AtomicBool::new(false));
    let local = Killable {
        inner: local,
        killed: killed.clone(),
    };
    let started = std::time::Instant::now();
    let work = async {
        let stopped_while_dialling = async {
            life.stop.cancelled().await;
            tokio::time::sleep(DIAL_AT_STOP).await;
        };
        let dialled = tokio::select! {
            r = connector.connect() => r.map_err(|e| e.to_string()),
            _ = stopped_while_dialling => Err(format!(
                "forward is shutting down and the connection was still being set up after {DIAL_AT_STOP:?}: reset"
            )),
        };
        let remote = match dialled {
            Ok(r) => r,
            Err(e) => {
                // The local client must not mistake a failed forward for an empty answer.
                local.abort();
                return Err((e, false));
            }
        };
        tracing::debug!(after = ?started.elapsed(), "connected");
        let relay_started = std::time::Instant::now();
        let unix = matches!(local.inner, LocalStream::Unix(_));
        relay(local, remote).await.map_err(|e| {
            let cancelled = e.reset_by_a();
            let text = explain(&e, "local", unix, &*connector, relay_started.elapsed());
            (text, cancelled)
        })
    };
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => match r {
            Ok(stats) => tracing::debug!(
                up = stats.a_to_b,
                down = stats.b_to_a,
                lasted = ?started.elapsed(),
                "closed"
            ),
            // Keyed by the cause, not the whole line: one refused target fails either way
            // round ("writing to remote failed: …" or "reading from remote failed: …"),
            // whichever direction noticed first, and logged a line for each (a tester's nit).
            // The local client reset its connection (a cancelled request, a health check):
            // its own doing, passed on as a reset, and no failure of the forward's (a WARN
            // each, 210-272 in 10 minutes of a client that cancels 5 %, a tester's finding).
            Err((e, true)) => tracing::debug!(forward = %label, "local client reset the connection: {e}"),
            Err((e, false)) => {
                let cause = e.rsplit_once("failed: ").map_or(e.as_str(), |(_, cause)| cause);
                match failures.repeats.pass(cause) {
                    Some(0) => tracing::warn!(forward = %label, "connection failed: {e}"),
                    Some(more) => tracing::warn!(
                        forward = %label,
                        not_logged = more,
                        "connection failed: {e} (and {more} more the same way)"
                    ),
                    None => {
                        tracing::debug!(forward = %label, "connection failed: {e}");
                        failures.count_later(cause);
                    }
                }
            }
        },
        _ = abort.cancelled() => {
            // The relay's next look at the local side fails, and it resets both sides as for
            // any error. A dial still in progress gets a moment, then is dropped.
            killed.store(true, Ordering::Relaxed);
            let _ = tokio::time::timeout(Duration::from_millis(500), work).await;
            tracing::warn!(forward = %label, "connection reset at shutdown");
        }
    }
}

/// The local side of a connection, which fails every read and write once `killed` is set:
/// how the grace period's end reaches a relay in progress without holding a second descriptor
/// per connection.
struct Killable {
    inner: LocalStream,
    killed: Arc<AtomicBool>,
}

impl Killable {
    fn check(&self) -> io::Result<()> {
        if self.killed.load(Ordering::Relaxed) {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "forward is shutting down and the grace period is over",
            ))
        } else {
            Ok(())
        }
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        // Dropped after the grace period with its dial still running (the relay that would
        // have reset it never started): the local client must see a reset, not a clean end.
        if self.killed.load(Ordering::Relaxed) {
            self.inner.abort();
        }
    }
}

impl Endpoint for Killable {
    fn abort(&self) {
        self.inner.abort();
    }

    fn before_shutdown(&self) {
        self.inner.before_shutdown();
    }

    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.inner.poll_reset(cx)
    }
}

impl AsyncRead for Killable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Killable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    // Without these the relay's vectored writes of mux chunks became one write per chunk.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Repeats left out are counted when their interval ends, by one timer however many there
    /// were, and not again.
    #[tokio::test(start_paused = true)]
    async fn repeats_left_out_are_counted_at_the_end_of_the_interval() {
        let f = Arc::new(Failures {
            repeats: Repeats::new(),
            label: "test".into(),
        });
        assert_eq!(f.repeats.pass("down"), Some(0));
        for _ in 0..3 {
            assert_eq!(f.repeats.pass("down"), None);
            f.count_later("down");
        }
        assert_eq!(f.repeats.left_out("down"), 3);
        tokio::time::sleep(crate::throttle::LOG_EVERY / 2).await;
        assert_eq!(
            f.repeats.left_out("down"),
            3,
            "counted before the interval ended"
        );
        tokio::time::sleep(crate::throttle::LOG_EVERY).await;
        assert_eq!(
            f.repeats.left_out("down"),
            0,
            "not counted at the interval's end"
        );
    }
}
