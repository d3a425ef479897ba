//! Carrier bytes in: decoding, the checks made from a header alone, and the effect of each frame.

use std::time::Instant;

use bytes::Bytes;

use super::output::note_activity;
use super::{Auth, Role, Session};
use crate::codes::{ErrorCode, ResetCode};
use crate::error::SessionError;
use crate::event::{CloseReason, Event};
use crate::frame::{self, Frame, FrameType, Header, StreamId, Target};
use crate::stream::{RecvState, Stream};

/// Largest credit a peer may hold (as in h2): an increment beyond it is a flow-control error.
const MAX_WINDOW: u64 = (1 << 31) - 1;

/// Control bytes (ping answers, refusals, credit) we may owe a peer that does not read its carrier;
/// beyond this the peer is making us buffer without bound.
const MAX_CTRL_BACKLOG: usize = 1 << 20;

impl Session {
    /// Feed bytes received from the carrier (any split). Events become available from
    /// [`Session::poll_event`], answers from [`Session::poll_transmit`].
    ///
    /// On a protocol violation the session closes itself (a `GOAWAY` is queued and `Event::Closed`
    /// emitted) and the violation is returned; later calls return [`SessionError::Closed`]. Closing
    /// drops queued stream events: after `Closed`, every stream is simply gone.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) -> Result<(), SessionError> {
        if self.closed.is_some() {
            return Err(SessionError::Closed);
        }
        self.now = now;
        if !data.is_empty() {
            self.last_recv = now;
            self.probe = None;
            self.answer_due = None;
        }
        let mut input = data;
        let mut decoder = std::mem::take(&mut self.decoder);
        let result = loop {
            match decoder.decode_checked(&mut input, |ty, h| self.check_header(ty, h)) {
                Ok(Some(frame)) => {
                    if let Err(e) = self.on_frame(frame) {
                        break Err(e);
                    }
                    if self.ctrl.len() - self.ctrl_pos > MAX_CTRL_BACKLOG {
                        break Err(SessionError::Protocol {
                            code: ErrorCode::EnhanceYourCalm,
                            detail:
                                "peer keeps provoking control frames without reading the carrier"
                                    .into(),
                        });
                    }
                    if self.closed.is_some() {
                        break Ok(());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.decoder = decoder;
        result.map_err(|e| self.fail(e))
    }

    fn is_known_id(&self, id: StreamId) -> bool {
        id % 2 == 1
            && match self.role {
                Role::Server => id <= self.max_peer_id,
                Role::Client => u64::from(id) < self.next_id,
            }
    }

    /// Checks that need only the header, made before the payload is buffered.
    fn check_header(&mut self, ty: FrameType, h: &Header) -> Result<(), SessionError> {
        self.check_phase(ty)?;
        if ty != FrameType::Data {
            return Ok(());
        }
        let id = h.stream_id;
        let len = u64::from(h.length);
        if self.conn_received + len > self.conn_recv_limit {
            return Err(SessionError::flow(format!(
                "DATA on stream {id} exceeds the connection window by {} bytes",
                self.conn_received + len - self.conn_recv_limit
            )));
        }
        match self.streams.get(&id) {
            Some(s) => {
                if s.recv != RecvState::Open {
                    return Err(SessionError::protocol(format!(
                        "DATA on stream {id} after its FIN"
                    )));
                }
                if self.role == Role::Client && !s.accepted {
                    return Err(SessionError::protocol(format!(
                        "DATA on stream {id} before OPEN_OK"
                    )));
                }
                if s.recv_received + len > s.recv_limit {
                    return Err(SessionError::flow(format!(
                        "DATA on stream {id} exceeds its window by {} bytes",
                        s.recv_received + len - s.recv_limit
                    )));
                }
                Ok(())
            }
            None if self.is_known_id(id) => Ok(()),
            None => Err(SessionError::protocol(format!(
                "DATA on stream {id}, which was never opened"
            ))),
        }
    }

    /// Which frames each side may receive in each authentication phase.
    fn check_phase(&self, ty: FrameType) -> Result<(), SessionError> {
        use FrameType as T;
        let sent_by_server_only = matches!(ty, T::AuthOk | T::AuthFail | T::OpenOk);
        let sent_by_client_only = matches!(ty, T::Auth | T::Open);
        match self.role {
            Role::Server => {
                if sent_by_server_only {
                    return Err(SessionError::protocol(format!(
                        "{ty} frame sent by the client"
                    )));
                }
                match (self.auth, ty) {
                    (Auth::Start, T::Auth) => Ok(()),
                    (Auth::Start, _) => {
                        Err(SessionError::protocol(format!("{ty} frame before AUTH")))
                    }
                    (_, T::Auth) => Err(SessionError::protocol("second AUTH frame")),
                    _ => Ok(()),
                }
            }
            Role::Client => {
                if sent_by_client_only {
                    return Err(SessionError::protocol(format!(
                        "{ty} frame sent by the server"
                    )));
                }
                match (self.auth, ty) {
                    (Auth::Start, _) => Err(SessionError::protocol(format!(
                        "{ty} frame before AUTH was sent"
                    ))),
                    (Auth::Pending, T::AuthOk | T::AuthFail | T::GoAway) => Ok(()),
                    (Auth::Pending, _) => {
                        Err(SessionError::protocol(format!("{ty} frame before AUTH_OK")))
                    }
                    (Auth::Done, T::AuthOk | T::AuthFail) => {
                        Err(SessionError::protocol(format!("{ty} after AUTH_OK")))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), SessionError> {
        match frame {
            Frame::Auth(payload) => {
                self.auth = Auth::Pending;
                self.events.push_back(Event::AuthRequest(payload.to_vec()));
            }
            Frame::AuthOk => {
                self.auth = Auth::Done;
                self.events.push_back(Event::AuthOk);
            }
            Frame::AuthFail => {
                self.events.push_back(Event::AuthFailed);
                self.close(CloseReason::AuthRejected, None);
            }
            Frame::Open { id, target } => self.on_open(id, target)?,
            Frame::OpenOk { id } => self.on_open_ok(id)?,
            Frame::Data { id, fin, payload } => self.on_data(id, fin, payload),
            Frame::WindowUpdate { id, increment } => self.on_window_update(id, increment)?,
            Frame::Rst { id, code } => self.on_rst(id, code)?,
            Frame::Ping { ack, opaque } => self.on_ping(ack, opaque)?,
            Frame::GoAway {
                last_id,
                code,
                reason,
            } => self.on_goaway(last_id, code, reason),
        }
        Ok(())
    }

    fn on_open(&mut self, id: StreamId, target: Target) -> Result<(), SessionError> {
        if id.is_multiple_of(2) {
            return Err(SessionError::protocol(format!(
                "OPEN with even stream id {id}"
            )));
        }
        if id <= self.max_peer_id {
            return Err(SessionError::protocol(format!(
                "OPEN reuses stream id {id} (ids must increase; last was {})",
                self.max_peer_id
            )));
        }
        self.max_peer_id = id;
        let refusal = if self.local_goaway {
            Some(ResetCode::GoingAway)
        } else if self.streams.len() >= self.config.max_concurrent_streams
            || self.pending_opens >= self.config.max_pending_opens
        {
            Some(ResetCode::StreamLimit)
        } else {
            None
        };
        if let Some(code) = refusal {
            frame::encode_rst(&mut self.ctrl, id, code);
            return Ok(());
        }
        let mut stream = Stream::new(self.config.stream_window, false);
        if let Some(granted) = self.min_rtt.and_then(|min| self.now.checked_sub(min)) {
            stream.mark_first_grant(granted);
        }
        self.streams.insert(id, stream);
        self.pending_opens += 1;
        self.events.push_back(Event::Opened { id, target });
        Ok(())
    }

    fn on_open_ok(&mut self, id: StreamId) -> Result<(), SessionError> {
        if self.answer_reset_due(id, true) {
            return Ok(());
        }
        let known = self.is_known_id(id);
        match self.streams.get_mut(&id) {
            Some(s) if !s.open_sent => Err(SessionError::protocol(format!(
                "OPEN_OK for stream {id}, whose OPEN was not sent yet"
            ))),
            Some(s) if !s.accepted => {
                s.accepted = true;
                self.pending_opens -= 1;
                self.events.push_back(Event::OpenOk(id));
                self.release_deferred_opens();
                Ok(())
            }
            Some(_) => Err(SessionError::protocol(format!(
                "second OPEN_OK for stream {id}"
            ))),
            None if known => Ok(()),
            None => Err(SessionError::protocol(format!(
                "OPEN_OK for stream {id}, which was never opened"
            ))),
        }
    }

    fn on_data(&mut self, id: StreamId, fin: bool, payload: Bytes) {
        let len = payload.len();
        self.conn_received += len as u64;
        let Some(s) = self.streams.get_mut(&id) else {
            // A stream we already reset: the bytes were in flight. Nobody reads them, so their
            // connection credit comes back at once.
            self.release_connection_credit(len);
            return;
        };
        if self.config.auto_tune {
            if len > 0 {
                note_activity(&mut self.recent, id, self.now);
            }
            // Bins of an eighth of the minimum RTT (at least 1 ms): see `Stream::sample_rate`.
            let bin = (self.min_rtt.unwrap_or(RATE_BIN_MIN) / 8).max(RATE_BIN_MIN);
            s.sample_rate(self.now, bin, len);
        }
        s.recv_received += len as u64;
        if let Some((limit, sent)) = s.rtt_mark {
            if s.recv_received >= limit {
                // Every byte of a grant arrived: at least one round trip since the update left.
                // Only the minimum is used; queues and lost segments make samples longer.
                s.rtt_mark = None;
                let sample = self.now.saturating_duration_since(sent);
                s.grant_rtt = Some(sample);
                fold_min(&mut self.min_rtt, sample);
            }
        }
        if len > 0 {
            s.push_received(payload);
        }
        if fin {
            s.recv = RecvState::FinReceived;
            self.events.push_back(Event::Finished(id));
        }
        if !s.readable_signalled {
            s.readable_signalled = true;
            self.events.push_back(Event::Readable(id));
        }
        // After the bytes are on their stream, which then no longer counts as starved.
        self.grant_connection_credit();
    }

    fn on_window_update(&mut self, id: StreamId, increment: u32) -> Result<(), SessionError> {
        if increment == 0 {
            return Err(SessionError::protocol(format!(
                "WINDOW_UPDATE with a zero increment on stream {id}"
            )));
        }
        let inc = u64::from(increment);
        if id == 0 {
            self.conn_send_limit += inc;
            if self.conn_send_limit - self.conn_sent > MAX_WINDOW {
                return Err(SessionError::flow(
                    "WINDOW_UPDATE overflows the connection window",
                ));
            }
            self.note_send_credit();
            return Ok(());
        }
        let send_buffer = self.send_buffer();
        let known = self.is_known_id(id);
        match self.streams.get_mut(&id) {
            Some(s) => {
                s.send_limit += inc;
                if s.send_limit - s.send_accepted.min(s.send_limit) > MAX_WINDOW {
                    return Err(SessionError::flow(format!(
                        "WINDOW_UPDATE overflows the window of stream {id}"
                    )));
                }
                if s.want_writable && s.send_capacity(send_buffer) > 0 {
                    s.want_writable = false;
                    self.events.push_back(Event::Writable(id));
                }
                Ok(())
            }
            None if known => Ok(()),
            None => Err(SessionError::protocol(format!(
                "WINDOW_UPDATE for stream {id}, which was never opened"
            ))),
        }
    }

    fn on_rst(&mut self, id: StreamId, code: ResetCode) -> Result<(), SessionError> {
        // Rapid reset: OPEN then RST before the driver answered makes the server start a dial for
        // nothing. Resets of established streams are ordinary aborts and cost nothing extra, and the
        // client does not police its server (a burst of refusals must not kill the carrier).
        if self.role == Role::Server && self.streams.get(&id).is_some_and(|s| !s.accepted) {
            self.spend_reset_budget()?;
        }
        // Refused (or reset) by the server after we had reset it: both sides are done with it.
        if self.answer_reset_due(id, false) {
            return Ok(());
        }
        if self.streams.get(&id).is_some_and(|s| !s.open_sent) {
            return Err(SessionError::protocol(format!(
                "RST for stream {id}, whose OPEN was not sent yet"
            )));
        }
        if self.remove_stream(id).is_some() {
            self.events.push_back(Event::Reset { id, code });
            Ok(())
        } else if self.is_known_id(id) {
            Ok(())
        } else {
            Err(SessionError::protocol(format!(
                "RST for stream {id}, which was never opened"
            )))
        }
    }

    fn spend_reset_budget(&mut self) -> Result<(), SessionError> {
        let (interval, limit) = (self.config.budget_interval, self.config.reset_budget);
        if self.reset_budget.hit(self.now, interval, limit) {
            return Err(SessionError::Protocol {
                code: ErrorCode::EnhanceYourCalm,
                detail: format!(
                    "more than {limit} streams reset before being answered within {interval:?}"
                ),
            });
        }
        Ok(())
    }

    fn on_ping(&mut self, ack: bool, opaque: [u8; 8]) -> Result<(), SessionError> {
        if ack {
            let value = u64::from_be_bytes(opaque);
            if let Some((expected, Some(sent))) = self.ping_out {
                if expected == value {
                    self.ping_out = None;
                    let sample = self.now.saturating_duration_since(sent);
                    self.rtt = Some(match self.rtt {
                        None => sample,
                        Some(rtt) => (rtt * 7 + sample) / 8,
                    });
                    let first = self.min_rtt.is_none();
                    fold_min(&mut self.min_rtt, sample);
                    if first && self.closed.is_none() {
                        // The first ping rides with AUTH / AUTH_OK and includes the peer's
                        // authentication work; a second one, at once, measures the bare path.
                        self.queue_ping();
                    }
                }
            }
            return Ok(());
        }
        let (interval, limit) = (self.config.budget_interval, self.config.ping_budget);
        if self.ping_budget.hit(self.now, interval, limit) {
            return Err(SessionError::Protocol {
                code: ErrorCode::EnhanceYourCalm,
                detail: format!("more than {limit} pings within {interval:?}"),
            });
        }
        frame::encode_ping(&mut self.ctrl, true, opaque);
        Ok(())
    }

    fn on_goaway(&mut self, last_id: StreamId, code: ErrorCode, reason: String) {
        // The peer's words end up in our logs and errors: a line feed or an escape sequence
        // there could forge log lines, so control characters arrive escaped.
        let reason = if reason.chars().any(char::is_control) {
            reason.escape_default().to_string()
        } else {
            reason
        };
        tracing::debug!(last_id, %code, %reason, "peer sent GOAWAY");
        self.events.push_back(Event::GoAway {
            last_id,
            code,
            reason: reason.clone(),
        });
        if code != ErrorCode::NoError {
            self.close(CloseReason::PeerError { code, reason }, None);
            return;
        }
        self.peer_goaway = Some(last_id);
        if self.role == Role::Client {
            let mut unprocessed: Vec<StreamId> = self
                .streams
                .keys()
                .copied()
                .filter(|&id| id > last_id)
                .collect();
            unprocessed.sort_unstable();
            let due: Vec<StreamId> = self
                .resets_due
                .keys()
                .copied()
                .filter(|&id| id > last_id)
                .collect();
            for id in due {
                self.answer_reset_due(id, false);
            }
            for id in unprocessed {
                self.remove_stream(id);
                self.events.push_back(Event::Reset {
                    id,
                    code: ResetCode::GoingAway,
                });
            }
        }
    }
}

/// Shortest delivery-rate bin: below it, scheduling noise would dominate the rate.
const RATE_BIN_MIN: std::time::Duration = std::time::Duration::from_millis(1);

/// Folds an RTT sample into the minimum that window auto-tuning sizes windows by.
fn fold_min(min: &mut Option<std::time::Duration>, sample: std::time::Duration) {
    *min = Some(min.map_or(sample, |m| m.min(sample)));
}
