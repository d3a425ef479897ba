//! The tokio driver of a mux carrier: one [`forward_mux::Session`] behind a mutex, a reader task
//! that feeds it carrier bytes, a writer task that drains it onto the carrier, and
//! [`MuxStream`] handles that local connections read and write through.
//!
//! ```text
//!  carrier ──read──► reader task ──handle_input──► ┌─────────┐ ──wake──► MuxStream::poll_read
//!                                                  │ Session │ ◄─write── MuxStream::poll_write
//!  carrier ◄─write── writer task ◄─poll_transmit── └─────────┘    (notify the writer)
//!                    (also PING / timeouts at poll_timeout)
//! ```
//!
//! The reader never waits on a local socket: it only appends to stream buffers that the peer
//! may fill up to the stream's window, so one slow local reader stalls only its own stream.
//! The session's `poll_transmit` is round-robin between streams, so the writer is fair.
//! When the carrier dies every stream gets a reset error, never a clean EOF.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use forward_mux::{
    CloseReason, ErrorCode, Event, ReadChunk, ReadOutcome, ResetCode, Session, StreamError,
    StreamId, Target, Transmit,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, Notify};

use crate::relay::{Endpoint, MAX_IOV};

mod retry;
pub use retry::{Reopen, Reopening, RETRY_CAP};

/// Largest batch the writer hands to the carrier in one write.
const TX_BATCH: usize = 256 * 1024;
/// Most bytes drained from the carrier before one `handle_input`.
const RX_BUF: usize = 1024 * 1024;
/// The read buffer until the carrier is authenticated: an `AUTH` frame is a few dozen bytes,
/// and an agent may hold 1024 carriers waiting for theirs. At `RX_BUF` from the start, each
/// cost the agent 1.1 MB (1,000 waiting upgrades of a flood: 1.1 GB).
const RX_BUF_BEFORE_AUTH: usize = 16 * 1024;
/// How long the final frames (GOAWAY, close_notify) of a closed carrier may wait for a peer
/// that does not read before the socket is simply dropped.
const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// How long the peer's connection credit must stay below a quarter of its window before the
/// carrier counts as full (`Carrier::has_room`): long past a healthy transfer's dip before a
/// window update, as for the QUIC carrier's stalled readers.
const PEER_FULL_AFTER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct StreamSlot {
    read: Option<Waker>,
    write: Option<Waker>,
    /// Client: the agent reached the target (`OPEN_OK`), and who waits for that.
    open_ok: bool,
    open: Option<Waker>,
    reset: Option<ResetCode>,
    got_fin: bool,
    sent_fin: bool,
    /// Client: the target as shown in errors (`host:port`).
    target: Option<Arc<str>>,
}

struct Inner {
    session: Session,
    slots: HashMap<StreamId, StreamSlot>,
    dead: Option<String>,
    /// Streams still open when the carrier died: they were reset.
    cut: usize,
    /// A GOAWAY was sent or received, as far as this carrier logged: the peer's first is news,
    /// a second (a drain often ends with one) is not. Whether new streams may open is the
    /// session's to say (`Session::is_going_away`).
    going_away: bool,
    /// The last reason the peer gave in a GOAWAY: a carrier it then closes died for that reason,
    /// which says more than "closed" (an agent whose drain time ran out says so).
    peer_goaway: Option<String>,
    /// The carrier died of a breach of the protocol, by either side's account: its code.
    breach: Option<ErrorCode>,
    authed: bool,
    auth_request: Option<Vec<u8>>,
    opened: Option<mpsc::UnboundedSender<(StreamId, Target)>>,
}

/// One carrier: the session and the tasks that move its bytes.
pub struct Carrier {
    inner: Mutex<Inner>,
    /// Wakes the writer task: something to send, or a new timeout.
    tx: Notify,
    /// Wakes whoever waits for auth or death.
    state: Notify,
    label: String,
}

impl std::fmt::Debug for Carrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Carrier({})", self.label)
    }
}

/// The error of a stream reset with `code`; `target` (the client's streams) words a refusal
/// as a QUIC stream's is.
fn reset_error(code: ResetCode, target: Option<&str>) -> io::Error {
    use crate::policy::Refusal;
    let refusal = match code {
        ResetCode::NotAllowed => Some(Refusal::NotAllowed),
        ResetCode::Refused => Some(Refusal::Refused),
        ResetCode::DialTimeout => Some(Refusal::Timeout),
        ResetCode::Unreachable => Some(Refusal::Unreachable),
        _ => None,
    };
    let text = match (refusal, target) {
        (Some(r), Some(t)) => r.message(t),
        _ => format!("stream reset by the agent side: {code}"),
    };
    io::Error::new(io::ErrorKind::ConnectionReset, text)
}

fn dead_error(reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("carrier lost: {reason}"),
    )
}

impl Carrier {
    /// Starts the driver tasks over an established carrier stream. `leftover` holds bytes the
    /// HTTP upgrade read past its head. A server carrier delivers opened streams on the
    /// returned receiver.
    pub fn start<S>(
        io: S,
        session: Session,
        leftover: Vec<u8>,
        label: String,
    ) -> (
        Arc<Carrier>,
        Option<mpsc::UnboundedReceiver<(StreamId, Target)>>,
    )
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (opened, rx) = if session.role() == forward_mux::Role::Server {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let carrier = Arc::new(Carrier {
            inner: Mutex::new(Inner {
                session,
                slots: HashMap::new(),
                dead: None,
                cut: 0,
                going_away: false,
                peer_goaway: None,
                breach: None,
                authed: false,
                auth_request: None,
                opened,
            }),
            tx: Notify::new(),
            state: Notify::new(),
            label,
        });
        let (r, w) = tokio::io::split(io);
        tokio::spawn(read_loop(carrier.clone(), r, leftover));
        tokio::spawn(write_loop(carrier.clone(), w));
        (carrier, rx)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug elsewhere; keep serving what we can.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Label for logs (host and port of the peer).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Why the carrier died, if it did.
    pub fn dead_reason(&self) -> Option<String> {
        self.lock().dead.clone()
    }

    /// Not dead yet (it may be draining).
    pub fn is_alive(&self) -> bool {
        self.lock().dead.is_none()
    }

    /// Usable for new streams: alive, authenticated (client) or not, and not draining. A
    /// session that closed is not, though its writer may still be flushing the last frames.
    pub fn is_usable(&self) -> bool {
        let g = self.lock();
        g.dead.is_none() && !g.session.is_going_away() && !g.session.is_closed()
    }

    /// Whether the carrier died of a breach of the protocol (either side's account): talking
    /// again would break it again, unlike a drop.
    pub fn broke_protocol(&self) -> bool {
        self.lock().breach.is_some()
    }

    /// Alive and still carrying its streams, but taking no new ones (a GOAWAY went either way).
    pub fn is_draining(&self) -> bool {
        let g = self.lock();
        g.dead.is_none() && g.session.is_going_away() && !g.session.is_closed()
    }

    /// Client: before a new stream is trusted to this carrier, makes sure it is alive. One that
    /// has heard nothing for longer than `silence` (a live peer answers keepalives well within
    /// it) is pinged, and this waits up to `within` for any byte from the peer; if none comes,
    /// the carrier is declared dead (its streams are reset, as they would be at the idle
    /// timeout) and the reason is returned. Without this, a connection made while the path is
    /// silently dead would wait for the idle timeout (45 s) before being reset.
    pub async fn confirm_alive(&self, silence: Duration, within: Duration) -> Result<(), String> {
        let started = Instant::now();
        {
            let mut g = self.lock();
            if let Some(d) = &g.dead {
                return Err(d.clone());
            }
            if g.session.silent_for(started) <= silence {
                return Ok(());
            }
            g.session.probe(started, within);
            tracing::debug!(carrier = %self.label, silent = ?g.session.silent_for(started), "silent carrier: pinging it before use");
        }
        // The writer sends the PING and arms its timer for the probe's deadline.
        self.tx.notify_one();
        loop {
            let notified = self.state.notified();
            {
                let g = self.lock();
                if let Some(reason) = g.end_reason() {
                    return Err(reason);
                }
                if !g.session.is_probing() {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// Client: the agent accepted our proof. Server: we accepted the client's.
    pub fn is_authenticated(&self) -> bool {
        self.lock().authed
    }

    /// Number of open streams (for metrics and drain).
    pub fn stream_count(&self) -> usize {
        self.lock().session.stream_count()
    }

    /// Whether another stream fits under the session's concurrent-stream cap, and the carrier
    /// can still carry it both ways: once streams whose readers stopped reading hold most of
    /// the connection window (about 190 stalled downloads at the initial stream window), or
    /// the peer's readers (VM services that stopped reading uploads) have left us less than a
    /// quarter of its window for a second, a new stream here would soon wait with them, so it
    /// goes on another carrier instead.
    pub fn has_room(&self) -> bool {
        self.full().is_none()
    }

    /// Why [`Carrier::has_room`] says no, for the log; `None` when it has room.
    pub fn full(&self) -> Option<&'static str> {
        let g = self.lock();
        let config = g.session.config();
        if g.session.stream_count() >= config.max_concurrent_streams {
            Some("at its stream limit")
        } else if g.session.connection_held() >= u64::from(config.connection_window) / 4 * 3 {
            Some("local readers that stopped reading hold its window")
        } else if g
            .session
            .send_credit_low_since()
            .is_some_and(|since| since.elapsed() >= PEER_FULL_AFTER)
        {
            Some("the agent holds most of its window (VM services not reading)")
        } else {
            None
        }
    }

    /// Client: queues the AUTH proof (before any open, so it goes first on the wire).
    pub fn send_auth(&self, proof: &[u8]) -> Result<(), forward_mux::SessionError> {
        self.lock().session.send_auth(proof)?;
        self.tx.notify_one();
        Ok(())
    }

    /// Client: waits until the agent accepted or refused the proof, or the carrier died.
    pub async fn wait_authed(&self) -> Result<(), String> {
        loop {
            let notified = self.state.notified();
            {
                let g = self.lock();
                if g.authed {
                    return Ok(());
                }
                if let Some(d) = &g.dead {
                    return Err(d.clone());
                }
            }
            notified.await;
        }
    }

    /// Server: waits for the client's AUTH payload (the session enforces the deadline).
    pub async fn wait_auth_request(&self) -> Result<Vec<u8>, String> {
        loop {
            let notified = self.state.notified();
            {
                let mut g = self.lock();
                if let Some(p) = g.auth_request.take() {
                    return Ok(p);
                }
                if let Some(d) = &g.dead {
                    return Err(d.clone());
                }
            }
            notified.await;
        }
    }

    /// How many streams were still open when the carrier died (they were reset).
    pub fn streams_cut(&self) -> usize {
        self.lock().cut
    }

    /// Resolves when the carrier is dead.
    pub async fn closed(&self) -> String {
        loop {
            let notified = self.state.notified();
            if let Some(d) = self.lock().dead.clone() {
                return d;
            }
            notified.await;
        }
    }

    /// Server: the verdict on the client's proof.
    pub fn decide_auth(&self, ok: bool) {
        let mut g = self.lock();
        let r = if ok {
            g.authed = true;
            g.session.auth_accept()
        } else {
            g.session.auth_reject()
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "auth decision on a closed session");
        }
        dispatch(&mut g, &self.state);
        drop(g);
        self.tx.notify_one();
    }

    /// Client: opens a stream with zero round trips; data may be written at once.
    pub fn open(self: &Arc<Self>, target: Target) -> Result<MuxStream, StreamError> {
        let mut g = self.lock();
        if g.dead.is_some() {
            return Err(StreamError::SessionClosed);
        }
        let shown = crate::policy::Shown(&target.host, target.port).to_string();
        let id = g.session.open(target)?;
        g.slots.insert(
            id,
            StreamSlot {
                target: Some(shown.into()),
                ..StreamSlot::default()
            },
        );
        drop(g);
        self.tx.notify_one();
        Ok(MuxStream {
            id,
            carrier: self.clone(),
            retry: None,
        })
    }

    /// Client: a stream was just opened on this carrier, so the agent should answer within
    /// `within`; if it does not, the carrier is probed, and closed if not even that is
    /// answered (see `Session::expect_answer`): a connection made just after the path died
    /// is reset in one or two `within`, not at the idle timeout.
    pub fn expect_answer(&self, within: Duration) {
        let mut g = self.lock();
        if g.dead.is_some() {
            return;
        }
        g.session.expect_answer(Instant::now(), within);
        drop(g);
        // The writer sends a probe's PING and re-arms its timer.
        self.tx.notify_one();
    }

    /// Server: accepts an opened stream after its target was dialled.
    pub fn accept(self: &Arc<Self>, id: StreamId) -> Result<MuxStream, StreamError> {
        let mut g = self.lock();
        if let Err(e) = g.session.accept(id) {
            g.slots.remove(&id);
            return Err(e);
        }
        g.slots.insert(id, StreamSlot::default());
        dispatch(&mut g, &self.state);
        drop(g);
        self.tx.notify_one();
        Ok(MuxStream {
            id,
            carrier: self.clone(),
            retry: None,
        })
    }

    /// Server: completes when the peer reset an opened stream that is not accepted yet, or the
    /// carrier ended, so a dial nobody waits for stops. Nothing else completes it.
    pub async fn abandoned(&self, id: StreamId) {
        std::future::poll_fn(|cx| {
            let mut g = self.lock();
            if g.dead.is_some() {
                return Poll::Ready(());
            }
            match g.slots.get_mut(&id) {
                Some(slot) if slot.reset.is_none() => {
                    slot.open = Some(cx.waker().clone());
                    Poll::Pending
                }
                _ => Poll::Ready(()),
            }
        })
        .await
    }

    /// Resets a stream (refused target, local error).
    pub fn reset(&self, id: StreamId, code: ResetCode) {
        let mut g = self.lock();
        if let Err(e) = g.session.reset(id, code) {
            tracing::trace!(stream = id, error = %e, "reset of a stream already gone");
        }
        g.slots.remove(&id);
        drop(g);
        self.tx.notify_one();
    }

    /// Graceful: GOAWAY, refuse new streams, let open ones drain.
    pub fn go_away(&self, reason: &str) {
        let mut g = self.lock();
        g.going_away = true;
        g.session.go_away(ErrorCode::NoError, reason);
        drop(g);
        self.tx.notify_one();
    }

    /// Closes without losing what the streams queued: GOAWAY, then a wait until every queued
    /// byte and `FIN` has left (credit permitting) or `deadline` passes, then [`Carrier::close`].
    /// The peer keeps the streams it received whole; a stream still sending at the deadline is
    /// reset. A client that exits right after its last upload "finished" needs this: `finish`
    /// only queues the `FIN`.
    pub async fn close_flushed(&self, reason: &str, deadline: tokio::time::Instant) {
        self.go_away(reason);
        loop {
            {
                let g = self.lock();
                if g.dead.is_some() || !g.session.has_unsent() {
                    break;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::debug!(carrier = %self.label, "closing with bytes still queued: their streams are reset");
                break;
            }
            // The writer moves bytes as credit comes back; a short poll keeps this simple and
            // runs only once, at exit.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.close(reason);
    }

    /// Closes at once; every open stream is reset.
    pub fn close(&self, reason: &str) {
        let mut g = self.lock();
        g.session.close_now(ErrorCode::NoError, reason);
        dispatch(&mut g, &self.state);
        drop(g);
        self.tx.notify_one();
    }

    fn kill(&self, reason: String) {
        let mut g = self.lock();
        if g.dead.is_none() {
            tracing::debug!(carrier = %self.label, %reason, "carrier ended");
            // Close first, so `die` sees which streams outlive the close complete; its Closed
            // event is dispatched after `die` recorded the real cause, which it would otherwise
            // name "closed locally: internal error".
            g.session.close_now(ErrorCode::Internal, &reason);
            g.die(reason.clone());
            dispatch(&mut g, &self.state);
            wake_all(&mut g);
        }
        drop(g);
        self.state.notify_waiters();
        self.tx.notify_one();
    }
}

impl Inner {
    /// Why the carrier ended: its recorded death, or the session's close that the driver has
    /// not turned into one yet (its writer may still be flushing the last frames).
    fn end_reason(&self) -> Option<String> {
        self.dead
            .clone()
            .or_else(|| self.session.close_reason().map(|r| r.to_string()))
    }

    /// Records the first cause of death, and how many streams it cut.
    fn die(&mut self, mut reason: String) {
        if self.dead.is_none() {
            if let Some(said) = &self.peer_goaway {
                reason = format!("{reason} (it had said: {said})");
            }
            let session = &self.session;
            self.cut = self
                .slots
                .iter()
                .filter(|(id, s)| {
                    !(s.got_fin && s.sent_fin)
                        && s.reset.is_none()
                        && !session.is_complete_after_close(**id)
                })
                .count();
            self.dead = Some(reason);
        }
    }
}

impl StreamSlot {
    /// Wakes whoever waits on the stream (a reset or the carrier's death ends every wait).
    fn wake(&mut self) {
        for w in [self.read.take(), self.write.take(), self.open.take()]
            .into_iter()
            .flatten()
        {
            w.wake();
        }
    }
}

fn wake_all(g: &mut Inner) {
    g.slots.values_mut().for_each(StreamSlot::wake);
}

/// Applies the session's events: wake streams, record auth and death.
fn dispatch(g: &mut Inner, state: &Notify) {
    let mut state_changed = false;
    while let Some(ev) = g.session.poll_event() {
        match ev {
            Event::Readable(id) | Event::Finished(id) => {
                if let Some(w) = g.slots.get_mut(&id).and_then(|s| s.read.take()) {
                    w.wake();
                }
            }
            Event::Writable(id) => {
                if let Some(w) = g.slots.get_mut(&id).and_then(|s| s.write.take()) {
                    w.wake();
                }
            }
            Event::Reset { id, code } => {
                if let Some(s) = g.slots.get_mut(&id) {
                    s.reset = Some(code);
                    s.wake();
                }
            }
            Event::Opened { id, target } => {
                let refused = match &g.opened {
                    Some(tx) => tx.send((id, target)).is_err(),
                    None => true,
                };
                if refused {
                    // Nobody takes streams any more: the agent is shutting down, and never
                    // dialled this one (not a refusal by the target).
                    let _ = g.session.reset(id, ResetCode::GoingAway);
                } else {
                    // Holds the peer's reset of a stream still being dialled (`abandoned`).
                    g.slots.insert(id, StreamSlot::default());
                }
            }
            Event::AuthRequest(p) => {
                g.auth_request = Some(p);
                state_changed = true;
            }
            Event::AuthOk => {
                g.authed = true;
                state_changed = true;
            }
            Event::AuthFailed => {
                g.die(CloseReason::AuthRejected.to_string());
                state_changed = true;
            }
            // With an error code it is the peer closing the carrier, not a drain: the
            // `Closed` that follows says so, reason included, as the carrier's loss.
            Event::GoAway { code, .. } if code != ErrorCode::NoError => {}
            Event::GoAway { reason, code, .. } => {
                // A drain often ends in a second GOAWAY; once is news, twice is noise.
                if !g.going_away {
                    if g.session.role() == forward_mux::Role::Server {
                        tracing::debug!(%code, %reason, "the client is leaving");
                    } else {
                        tracing::info!(%code, %reason, "peer is going away: new connections use a new carrier");
                    }
                }
                g.going_away = true;
                if !reason.is_empty() {
                    g.peer_goaway = Some(reason);
                }
                state_changed = true;
            }
            Event::Closed { reason } => {
                if let CloseReason::PeerError { code, .. }
                | CloseReason::ProtocolError { code, .. } = &reason
                {
                    g.breach = Some(*code).filter(|c| {
                        matches!(
                            c,
                            ErrorCode::ProtocolError
                                | ErrorCode::FrameSizeError
                                | ErrorCode::FlowControlError
                                | ErrorCode::Other(_)
                        )
                    });
                }
                g.die(reason.to_string());
                wake_all(g);
                state_changed = true;
            }
            Event::OpenOk(id) => {
                if let Some(s) = g.slots.get_mut(&id) {
                    s.open_ok = true;
                    if let Some(w) = s.open.take() {
                        w.wake();
                    }
                }
            }
            _ => {}
        }
    }
    if state_changed {
        state.notify_waiters();
    }
}

async fn read_loop<R: AsyncRead + Unpin>(carrier: Arc<Carrier>, mut r: R, leftover: Vec<u8>) {
    let mut buf = leftover;
    let mut n = buf.len();
    buf.resize(RX_BUF_BEFORE_AUTH.max(n), 0);
    let mut grown = false;
    let mut end: Option<String> = None;
    loop {
        if !grown && carrier.is_authenticated() {
            buf.resize(RX_BUF.max(buf.len()), 0);
            grown = true;
        }
        // Take everything already waiting before handing it over. The session dates all of it
        // `now`; bytes left in the socket would be dated at the next read, after other tasks
        // ran, as if they had crossed the path in that moment. Window tuning read such a
        // leftover backlog as a burst at 5.6× the link's rate and grew a window 1 → 4 MiB
        // (300 ms of queue at 50 ms RTT).
        while n < buf.len() && end.is_none() {
            let Some(read) = drain_ready(&mut r, &mut buf[n..]).await else {
                break;
            };
            match read_outcome(read) {
                Ok(k) => n += k,
                Err(reason) => end = Some(reason),
            }
        }
        if n > 0 {
            let mut g = carrier.lock();
            let probing = g.session.is_probing();
            let res = g.session.handle_input(Instant::now(), &buf[..n]);
            dispatch(&mut g, &carrier.state);
            if probing {
                // Whoever waits in `confirm_alive` learns the carrier answered.
                carrier.state.notify_waiters();
            }
            let dead = g.session.is_closed();
            drop(g);
            carrier.tx.notify_one();
            if let Err(e) = res {
                // Before authentication the peer is anyone on the internet: its garbage must not
                // fill the log (the agent reports such carriers, throttled, when they end).
                if carrier.is_authenticated() {
                    tracing::warn!(carrier = %carrier.label, error = %e, "closing carrier: protocol error");
                } else {
                    tracing::debug!(carrier = %carrier.label, error = %e, "closing an unauthenticated carrier: protocol error");
                }
            }
            if dead {
                // Let the writer flush the GOAWAY; the reader has nothing more to do.
                let reason = carrier
                    .dead_reason()
                    .unwrap_or_else(|| "protocol error".into());
                carrier.kill(reason);
                return;
            }
        }
        if let Some(reason) = end {
            carrier.kill(reason);
            return;
        }
        // A carrier that died elsewhere (idle or auth timeout, local close) must not keep this
        // half of the socket open waiting for a peer that may never send again.
        let read = tokio::select! {
            biased;
            _ = carrier.closed() => return,
            read = r.read(&mut buf) => read,
        };
        n = match read_outcome(read) {
            Ok(k) => k,
            Err(reason) => {
                carrier.kill(reason);
                return;
            }
        };
    }
}

/// One read of whatever `r` has ready now: `None` when it would have to wait.
async fn drain_ready<R: AsyncRead + Unpin>(r: &mut R, dst: &mut [u8]) -> Option<io::Result<usize>> {
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(dst);
        match Pin::new(&mut *r).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Ready(None),
            Poll::Ready(res) => Poll::Ready(Some(res.map(|()| rb.filled().len()))),
        }
    })
    .await
}

/// The bytes a carrier read brought, or why the carrier ends.
fn read_outcome(read: io::Result<usize>) -> Result<usize, String> {
    match read {
        Ok(0) => Err("the peer closed the carrier".into()),
        Ok(n) => Ok(n),
        // rustls words this one with a link to its manual, which a user's log has no use for.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(
            "carrier cut: the peer closed the connection without TLS close_notify (an edge or agent restart, or a broken path)".into(),
        ),
        Err(e) => Err(format!("carrier read failed: {e}")),
    }
}

/// Writes all of `out`. Payloads go to the kernel (or to rustls) straight from the streams'
/// send buffers in one vectored write; the copy into one contiguous batch cost the agent 4 % of
/// its CPU at 8 Gbit/s. A writer without vectored writes gets one contiguous copy instead of a
/// write per 12-byte header.
async fn write_transmit<W: AsyncWrite + Unpin>(w: &mut W, out: &mut Transmit) -> io::Result<()> {
    if !w.is_write_vectored() {
        let all = out.to_vec();
        w.write_all(&all).await?;
        out.advance(all.len());
        return Ok(());
    }
    while !out.is_empty() {
        let slices: Vec<io::IoSlice<'_>> =
            out.chunks().take(MAX_IOV).map(io::IoSlice::new).collect();
        let n = w.write_vectored(&slices).await?;
        drop(slices);
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        out.advance(n);
    }
    Ok(())
}

async fn write_loop<W: AsyncWrite + Unpin>(carrier: Arc<Carrier>, mut w: W) {
    let mut out = Transmit::new();
    let mut yielded = false;
    loop {
        let step = {
            let mut g = carrier.lock();
            let now = Instant::now();
            let due = g.session.poll_timeout().is_some_and(|t| t <= now);
            if due && !yielded {
                None
            } else {
                if due {
                    g.session.handle_timeout(now);
                }
                loop {
                    let room = TX_BATCH - out.len();
                    if room == 0 || g.session.poll_transmit_chunks(now, &mut out, room) == 0 {
                        break;
                    }
                }
                dispatch(&mut g, &carrier.state);
                Some((g.session.poll_timeout(), g.session.is_closed()))
            }
        };
        let Some((deadline, closed)) = step else {
            // After a process stood still (a suspended laptop, SIGSTOP), a due timer may be the
            // first thing we see, before the runtime has looked at the sockets: the keepalives
            // waiting there were ignored and a live carrier declared dead. A yielded task
            // resumes after the runtime polled for I/O, so the reader takes them in first.
            yielded = true;
            tokio::task::yield_now().await;
            continue;
        };
        yielded = false;
        if !out.is_empty() {
            let write = async {
                write_transmit(&mut w, &mut out).await?;
                w.flush().await
            };
            // A peer that stops reading blocks this write for good; the session's timers
            // must still run, or such a carrier would never be declared dead.
            let res = tokio::select! {
                res = write => res,
                reason = give_up_writing(&carrier) => {
                    carrier.kill(reason);
                    return;
                }
            };
            if let Err(e) = res {
                carrier.kill(format!("carrier write failed: {e}"));
                return;
            }
            continue;
        }
        if closed {
            let reason = {
                let g = carrier.lock();
                g.session
                    .close_reason()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "closed".into())
            };
            // Orderly end of the byte stream (close_notify on TLS) after the final frames.
            match tokio::time::timeout(FLUSH_GRACE, w.shutdown()).await {
                Ok(Err(e)) => tracing::trace!(error = %e, "carrier shutdown"),
                Err(_) => tracing::debug!("peer does not read: carrier closed without shutdown"),
                Ok(Ok(())) => {}
            }
            carrier.kill(reason);
            return;
        }
        let sleep = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = carrier.tx.notified() => {}
            _ = sleep => {}
        }
    }
}

/// Resolves when a blocked carrier write should be abandoned: the session's idle or auth
/// timeout fired while the writer could not get back to its loop, or the carrier died and its
/// final frames had [`FLUSH_GRACE`] to leave.
async fn give_up_writing(carrier: &Carrier) -> String {
    let mut dead_since: Option<tokio::time::Instant> = None;
    loop {
        let notified = carrier.state.notified();
        let wake_at = {
            let mut g = carrier.lock();
            let now = Instant::now();
            if g.session.poll_timeout().is_some_and(|t| t <= now) {
                g.session.handle_timeout(now);
                dispatch(&mut g, &carrier.state);
            }
            let reason = g.end_reason();
            match reason {
                Some(reason) => {
                    let since = *dead_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= FLUSH_GRACE {
                        return reason;
                    }
                    Some(since + FLUSH_GRACE)
                }
                None => g.session.poll_timeout().map(tokio::time::Instant::from_std),
            }
        };
        let sleep = async {
            match wake_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = notified => {}
            _ = sleep => {}
        }
    }
}

/// One multiplexed stream: the local connection's view of its remote end.
///
/// Dropping it before both directions ended resets the stream, so the peer never mistakes an
/// abandoned stream for a finished one.
pub struct MuxStream {
    id: StreamId,
    carrier: Arc<Carrier>,
    /// Client: what it takes to open the stream again if the agent refuses it unprocessed,
    /// until the agent answers (see [`retry`]).
    retry: Option<Box<retry::Retry>>,
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MuxStream({} on {})", self.id, self.carrier.label)
    }
}

impl MuxStream {
    /// The stream id on its carrier.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Bytes received for this stream and not read yet, and its receive window; `None` once
    /// the stream is gone. The first never exceeds the second, however slow the local reader:
    /// that bound is what keeps a stalled connection from growing the process.
    pub fn receive_backlog(&self) -> Option<(usize, u32)> {
        let g = self.carrier.lock();
        Some((
            g.session.stream_buffered(self.id)?,
            g.session.stream_window(self.id)?,
        ))
    }
}

impl MuxStream {
    /// Client: waits until the agent reached the target (`OPEN_OK`), or says why it could not
    /// (the stream's reset), or the carrier dies. Data needs no such wait; `--check` does.
    pub async fn opened(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_retrying(cx, Self::poll_opened)).await
    }

    fn poll_opened(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut g = self.carrier.lock();
        let dead = g.dead.clone();
        let Some(slot) = g.slots.get_mut(&self.id) else {
            return Poll::Ready(Err(dead_error(dead.as_deref().unwrap_or("stream gone"))));
        };
        if slot.open_ok {
            self.retry = None;
            return Poll::Ready(Ok(()));
        }
        if let Some(code) = slot.reset {
            return Poll::Ready(Err(reset_error(code, slot.target.as_deref())));
        }
        if let Some(d) = dead {
            return Poll::Ready(Err(dead_error(&d)));
        }
        slot.open = Some(cx.waker().clone());
        Poll::Pending
    }
}

fn stream_error(g: &Inner, id: StreamId, e: StreamError) -> io::Error {
    if let Some(s) = g.slots.get(&id) {
        if let Some(code) = s.reset {
            return reset_error(code, s.target.as_deref());
        }
    }
    if let Some(d) = &g.dead {
        return dead_error(d);
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e.to_string())
}

/// The stream's end if it has one (reset, carrier dead), else `Pending` with the waker kept
/// in `waiter` of its slot.
fn blocked(
    g: &mut Inner,
    id: StreamId,
    cx: &mut Context<'_>,
    waiter: fn(&mut StreamSlot) -> &mut Option<Waker>,
) -> Poll<io::Error> {
    if let Some(s) = g.slots.get(&id) {
        if let Some(code) = s.reset {
            return Poll::Ready(reset_error(code, s.target.as_deref()));
        }
    }
    if let Some(d) = &g.dead {
        return Poll::Ready(dead_error(d));
    }
    if let Some(s) = g.slots.get_mut(&id) {
        *waiter(s) = Some(cx.waker().clone());
    }
    Poll::Pending
}

impl MuxStream {
    /// What a read that found no bytes says: an error if the stream was reset or the carrier
    /// died, else `Pending` with the waker kept for the next `Readable`.
    fn read_blocked(&self, g: &mut Inner, cx: &mut Context<'_>) -> Poll<io::Error> {
        blocked(g, self.id, cx, |s| &mut s.read)
    }

    /// A read on a stream the session no longer knows: EOF again after a clean end both ways,
    /// else the reason.
    fn read_gone(&self, g: &Inner, e: StreamError) -> Option<io::Error> {
        if g.slots.get(&self.id).is_some_and(|s| s.got_fin) {
            return None;
        }
        Some(stream_error(g, self.id, e))
    }

    /// A write found no room: the stream's end if it has one, else wait for `Writable`.
    fn write_blocked(&self, g: &mut Inner, cx: &mut Context<'_>) -> Poll<io::Error> {
        blocked(g, self.id, cx, |s| &mut s.write)
    }

    /// Bytes were taken or written out: what that frees (credit, a finished stream's slot)
    /// may be worth a frame.
    fn after_take(&self, g: MutexGuard<'_, Inner>) {
        let notify = g.session.wants_transmit();
        drop(g);
        if notify {
            self.carrier.tx.notify_one();
        }
    }

    fn poll_read_once(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut g = self.carrier.lock();
        let dst = buf.initialize_unfilled();
        match g.session.read(self.id, dst) {
            Ok(ReadOutcome::Data(n)) => {
                buf.advance(n);
                // The agent answered: it will not refuse the stream any more.
                self.retry = None;
                self.after_take(g);
                Poll::Ready(Ok(()))
            }
            Ok(ReadOutcome::Fin) => {
                if let Some(s) = g.slots.get_mut(&self.id) {
                    s.got_fin = true;
                }
                self.retry = None;
                Poll::Ready(Ok(()))
            }
            Ok(ReadOutcome::Blocked) => self.read_blocked(&mut g, cx).map(Err),
            Err(e) => Poll::Ready(self.read_gone(&g, e).map_or(Ok(()), Err)),
        }
    }

    fn poll_write_once(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut g = self.carrier.lock();
        match g.session.write(self.id, data) {
            Ok(0) if !data.is_empty() => self.write_blocked(&mut g, cx).map(Err),
            Ok(n) => {
                if let Some(r) = self.retry.as_mut() {
                    let answered = g.slots.get(&self.id).is_some_and(|s| s.open_ok);
                    if answered || !r.keep(&data[..n]) {
                        self.retry = None;
                    }
                }
                drop(g);
                self.carrier.tx.notify_one();
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(stream_error(&g, self.id, e))),
        }
    }

    fn poll_shutdown_once(&mut self) -> Poll<io::Result<()>> {
        let mut g = self.carrier.lock();
        if g.slots.get(&self.id).is_some_and(|s| s.sent_fin) {
            return Poll::Ready(Ok(()));
        }
        match g.session.finish(self.id) {
            Ok(()) => {
                if let Some(s) = g.slots.get_mut(&self.id) {
                    s.sent_fin = true;
                }
                if let Some(r) = self.retry.as_mut() {
                    r.keep_fin();
                }
                drop(g);
                self.carrier.tx.notify_one();
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(stream_error(&g, self.id, e))),
        }
    }

    fn poll_read_chunks_once(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        let mut g = self.carrier.lock();
        let mut taken = 0;
        let end = loop {
            if taken == max {
                break Poll::Ready(Ok(()));
            }
            match g.session.take_chunk(self.id, max - taken) {
                Ok(ReadChunk::Data(chunk)) => {
                    taken += chunk.len();
                    out.push_back(chunk);
                }
                Ok(ReadChunk::Fin) => {
                    if let Some(s) = g.slots.get_mut(&self.id) {
                        s.got_fin = true;
                    }
                    self.retry = None;
                    break Poll::Ready(Ok(()));
                }
                Ok(ReadChunk::Blocked) => break self.read_blocked(&mut g, cx).map(Err),
                Err(e) => break Poll::Ready(self.read_gone(&g, e).map_or(Ok(()), Err)),
            }
        };
        // Bytes taken are the caller's even if the stream then failed or ended: report them
        // first, the end comes again on the next call.
        if taken > 0 {
            self.retry = None;
            self.after_take(g);
            Poll::Ready(Ok(taken))
        } else {
            end.map_ok(|()| 0)
        }
    }

    fn poll_write_room_once(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut g = self.carrier.lock();
        match g.session.send_room(self.id) {
            Ok(0) => self.write_blocked(&mut g, cx).map(Err),
            Ok(n) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(stream_error(&g, self.id, e))),
        }
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll_retrying(cx, |s, cx| s.poll_read_once(cx, buf))
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_retrying(cx, |s, cx| s.poll_write_once(cx, data))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bytes handed to the session are the writer task's to send; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll_retrying(cx, |s, _| s.poll_shutdown_once())
    }
}

impl Endpoint for MuxStream {
    fn abort(&self) {
        self.carrier.reset(self.id, ResetCode::Cancel);
    }

    /// The received chunks themselves, not a copy of them into the relay's buffer; all that
    /// are ready, under one lock. Their credit stays held until `chunks_written`.
    fn poll_read_chunks(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut VecDeque<Bytes>,
    ) -> Option<Poll<io::Result<usize>>> {
        Some(self.poll_retrying(cx, |s, cx| s.poll_read_chunks_once(cx, max, out)))
    }

    /// Their credit goes back now, not when they were taken: a local reader that stalls holds
    /// at most its stream's window, in the session or in the relay (it held a window more).
    fn chunks_written(&mut self, n: usize) {
        let mut g = self.carrier.lock();
        g.session.release(self.id, n);
        self.after_take(g);
    }

    fn poll_write_room(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<usize>>> {
        Some(self.poll_retrying(cx, Self::poll_write_room_once))
    }

    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        // What a blocked read says: the read side has ended, so its waker slot is free for the
        // trait's contract; the relay itself looks again on its reset-watch timer.
        let mut g = self.carrier.lock();
        self.read_blocked(&mut g, cx)
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let mut g = self.carrier.lock();
        let clean = g
            .slots
            .get(&self.id)
            .is_none_or(|s| s.got_fin && s.sent_fin && s.reset.is_none());
        g.slots.remove(&self.id);
        if !clean {
            // On a dead carrier this only frees what a stream kept readable after the close.
            if let Err(e) = g.session.reset(self.id, ResetCode::Cancel) {
                tracing::trace!(stream = self.id, error = %e, "reset on drop");
            }
            let alive = g.dead.is_none();
            drop(g);
            if alive {
                self.carrier.tx.notify_one();
            }
        }
    }
}
