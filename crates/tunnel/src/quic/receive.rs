//! Keeps a connection's receive window above what its open streams can hold unread.
//!
//! quinn gives every stream the same fixed window ([`STREAM_WINDOW`]) inside one receive window
//! for the whole connection. Were the connection's window fixed at 16 stream windows, 17 streams
//! opened together and read one after another (a script that starts downloads and then reads
//! them in order, a VM service that serves its connections one at a time) deadlocked: the
//! streams not yet read filled their windows with the credit the read one freed, until they
//! held all of it, and the read one never got another byte (a user's test: 16 streams finished,
//! 17 stopped for good after 16-60 MiB each). The TCP carrier returns a stream's credit once
//! its bytes reach the local socket, so the kernel's buffers hide the same limit there until
//! about a thousand streams.
//!
//! With the connection's window above what its open streams can hold, by more than the eighth
//! quinn waits for before it announces credit (see [`window_for`]), the streams not being read
//! can never hold all of it, so a stream whose reader reads always gets
//! its bytes. This bounds nothing that was bounded before: a stalled stream holds at most its
//! own window either way, and past 12 stalled streams the client opened another connection
//! with a fresh 16 windows anyway.
//!
//! Sans-IO: [`window_for`] decides; [`ReceiveWindow`] applies it to the quinn connection.

use std::sync::{Arc, Mutex, PoisonError};

use super::{STALLED_STREAMS_FIT, STREAM_WINDOW};

/// The connection receive window for `open` streams, never below the [`STALLED_STREAMS_FIT`]
/// windows it starts with. quinn announces returned credit (MAX_DATA) only once it reaches
/// an eighth of the window, so what the open streams cannot hold must be more than that
/// eighth, by at least one stream window: `open + 2 + open / 7` windows leave
/// `7/8 · window − open` ≥ 1 window. With only one window to spare, 24 uploads to a service
/// that reads them in turn stopped again: 32 MiB free, never announced, in a 400 MiB window.
pub(super) fn window_for(open: usize) -> u64 {
    let windows = open
        .saturating_add(2)
        .saturating_add(open / 7)
        .max(STALLED_STREAMS_FIT) as u64;
    windows.saturating_mul(u64::from(STREAM_WINDOW))
}

/// The open-stream count of one connection and the receive window last given to quinn.
pub(super) struct ReceiveWindow {
    conn: quinn::Connection,
    /// Open streams, and the window set for them. Under one lock, so that the last change to
    /// the count is the last window set, whichever thread opens or closes.
    state: Mutex<(usize, u64)>,
}

impl ReceiveWindow {
    /// The connection starts with the transport config's window, `window_for(0)`.
    pub(super) fn new(conn: &quinn::Connection) -> Arc<Self> {
        Arc::new(Self {
            conn: conn.clone(),
            state: Mutex::new((0, window_for(0))),
        })
    }

    /// Counts a stream open until the returned hold is dropped.
    pub(super) fn hold(self: &Arc<Self>) -> ReceiveHold {
        self.change(true);
        ReceiveHold(self.clone())
    }

    fn change(&self, opened: bool) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 = if opened {
            state.0 + 1
        } else {
            state.0.saturating_sub(1)
        };
        let window = window_for(state.0);
        if window != state.1 {
            state.1 = window;
            // A larger window is granted at once; a smaller one by withholding the credit of
            // bytes read until the difference is made up (quinn), so nothing granted is taken
            // back. VarInt holds 2^62: 1024 streams' windows are 2^34.
            self.conn
                .set_receive_window(quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX));
        }
    }
}

/// One open stream's share of [`ReceiveWindow`]; dropping it gives the share back.
pub(super) struct ReceiveHold(Arc<ReceiveWindow>);

impl Drop for ReceiveHold {
    fn drop(&mut self) {
        self.0.change(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_open_streams_cannot_hold_is_always_announced() {
        let w = u64::from(STREAM_WINDOW);
        assert_eq!(window_for(0), STALLED_STREAMS_FIT as u64 * w);
        for open in 0..=1024u64 {
            let window = window_for(open as usize);
            // Free credit beyond quinn's announcement threshold (an eighth), by a window.
            assert!(window - window / 8 >= (open + 1) * w, "{open} streams");
        }
        assert_eq!(window_for(24), 29 * w);
        assert!(quinn::VarInt::from_u64(window_for(usize::MAX)).is_err());
    }
}
