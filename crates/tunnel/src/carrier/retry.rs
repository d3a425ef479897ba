//! A client stream's second chance when the agent refused it unprocessed.
//!
//! An agent that is shutting down (a restart, a `--handover`) sends GOAWAY and refuses every
//! stream it had not taken yet with `GOING_AWAY`; one at its pending-open cap refuses with
//! `STREAM_LIMIT`. A stream opened in the instant before the client heard the GOAWAY is
//! refused that way. Both codes promise the agent never dialled the target (docs/protocol.md
//! §4), so nothing the user sent reached anyone: the stream is opened again through the link
//! (a new carrier when this one is going away) and what was written is written again, so the
//! user's connection carries on instead of being reset. Only once, only while the agent has
//! not answered, and only up to [`RETRY_CAP`] bytes: a request or a handshake, not an upload.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use super::{blocked, stream_error, MuxStream};

/// The future of the new stream.
pub type Reopening = Pin<Box<dyn Future<Output = io::Result<MuxStream>> + Send>>;

/// Opens the stream again, as it was opened, without a retry of its own.
pub type Reopen = Arc<dyn Fn() -> Reopening + Send + Sync>;

/// The most a stream keeps for a retry.
pub const RETRY_CAP: usize = 64 * 1024;

pub(super) struct Retry {
    reopen: Reopen,
    /// Every byte written so far.
    sent: Vec<u8>,
    /// The FIN was sent too.
    fin: bool,
    state: State,
    /// Tasks that wait for the retry besides the one driving it (a stream split into halves
    /// is polled from two tasks): woken when it is done.
    waiting: Vec<Waker>,
}

enum State {
    /// Keeping what is written until the agent answers.
    Armed,
    /// The agent refused the stream unprocessed (`cause`): opening it again.
    Reopening { next: Reopening, cause: String },
    /// On the new stream: writing `sent[pos..]` again.
    Resending { pos: usize },
}

impl Retry {
    pub(super) fn new(reopen: Reopen) -> Box<Self> {
        Box::new(Self {
            reopen,
            sent: Vec::new(),
            fin: false,
            state: State::Armed,
            waiting: Vec::new(),
        })
    }

    /// Keeps `data`, just written; `false` when that passes the cap and the retry must go.
    pub(super) fn keep(&mut self, data: &[u8]) -> bool {
        if self.sent.len() + data.len() > RETRY_CAP {
            return false;
        }
        self.sent.extend_from_slice(data);
        true
    }

    pub(super) fn keep_fin(&mut self) {
        self.fin = true;
    }
}

impl MuxStream {
    /// Client: gives the stream its second chance (see the module): `reopen` opens it again.
    pub fn with_retry(mut self, reopen: Reopen) -> Self {
        self.retry = Some(Retry::new(reopen));
        self
    }

    /// Runs `op`; when it fails because the agent refused the stream unprocessed, opens the
    /// stream again, re-sends what it carried, and runs `op` once more.
    pub(super) fn poll_retrying<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut op: impl FnMut(&mut Self, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        loop {
            // A retry that another poll started is finished before the stream is touched:
            // its id and carrier are being replaced.
            if self
                .retry
                .as_ref()
                .is_some_and(|r| !matches!(r.state, State::Armed))
            {
                ready!(self.poll_retry(cx))?;
            }
            match op(self, cx) {
                Poll::Ready(Err(e)) => ready!(self.poll_recover(cx, e))?,
                other => return other,
            }
        }
    }

    /// After `e`: starts the retry if the agent refused the stream unprocessed, else `e`
    /// (and the stream will never be retried).
    fn poll_recover(&mut self, cx: &mut Context<'_>, e: io::Error) -> Poll<io::Result<()>> {
        let Some(r) = self.retry.as_mut() else {
            return Poll::Ready(Err(e));
        };
        let refused = {
            let g = self.carrier.lock();
            g.slots
                .get(&self.id)
                .and_then(|s| s.reset.filter(|c| c.is_retryable() && !s.open_ok))
        };
        let Some(code) = refused else {
            self.retry = None;
            return Poll::Ready(Err(e));
        };
        tracing::info!(
            carrier = %self.carrier.label,
            bytes = r.sent.len(),
            "the agent did not process this stream ({code}): opening it again"
        );
        r.state = State::Reopening {
            next: (r.reopen)(),
            cause: e.to_string(),
        };
        self.poll_retry(cx)
    }

    /// Drives a started retry; when it ends, done or failed, the stream has no retry left
    /// (once only: a second refusal is an error like any other).
    fn poll_retry(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outcome = self.poll_retry_steps(cx);
        match &outcome {
            Poll::Pending => {
                if let Some(r) = self.retry.as_mut() {
                    if !r.waiting.iter().any(|w| w.will_wake(cx.waker())) {
                        r.waiting.push(cx.waker().clone());
                    }
                }
            }
            Poll::Ready(_) => {
                if let Some(r) = self.retry.take() {
                    r.waiting.into_iter().for_each(Waker::wake);
                }
            }
        }
        outcome
    }

    fn poll_retry_steps(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let r = self.retry.as_mut().expect("only a started retry is driven");
            match &mut r.state {
                State::Armed => unreachable!("only a started retry is driven"),
                State::Reopening { next, cause } => match ready!(next.as_mut().poll(cx)) {
                    Ok(mut fresh) => {
                        std::mem::swap(&mut self.id, &mut fresh.id);
                        std::mem::swap(&mut self.carrier, &mut fresh.carrier);
                        r.state = State::Resending { pos: 0 };
                        // `fresh` now holds the refused stream, which its drop forgets.
                    }
                    Err(e) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            format!("{cause}; opening it again failed: {e}"),
                        )))
                    }
                },
                State::Resending { pos } => {
                    let mut g = self.carrier.lock();
                    while *pos < r.sent.len() {
                        match g.session.write(self.id, &r.sent[*pos..]) {
                            Ok(0) => {
                                return blocked(&mut g, self.id, cx, |s| &mut s.write).map(Err)
                            }
                            Ok(n) => *pos += n,
                            Err(e) => return Poll::Ready(Err(stream_error(&g, self.id, e))),
                        }
                    }
                    if r.fin {
                        if let Err(e) = g.session.finish(self.id) {
                            return Poll::Ready(Err(stream_error(&g, self.id, e)));
                        }
                        if let Some(s) = g.slots.get_mut(&self.id) {
                            s.sent_fin = true;
                        }
                    }
                    drop(g);
                    self.carrier.tx.notify_one();
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}
