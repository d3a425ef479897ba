//! A peer that stops reading is not a dead path.
//!
//! Our TCP connections to an edge or an agent carry TCP_USER_TIMEOUT
//! ([`crate::dial::PATH_DEAD_AFTER`]) so that a path that died under them ends in 45 s, not in
//! the kernel's 15 minutes of retransmissions. But Linux applies that timeout to zero-window
//! probing too: a peer that answers every probe with "no room" for that long is cut off. A VM
//! service that stops reading for a while (a database waiting on a lock during a long `COPY`)
//! shuts the edge's window, and a direct connection's upload was reset after 45 s while the
//! agent modes, whose mux windows never let the socket fill, carried it through. So once a
//! write has been blocked for [`STALL_CHECK`], the kernel is asked (`/proc/net/tcp*`, its timer
//! column) whether it is probing a zero window; if so the peer is alive, and the timeout is
//! lifted until bytes move again. A dead path shows a retransmission timer instead and keeps
//! its 45 s.

use std::time::Duration;

use tokio::net::TcpStream;

/// How long a write must be blocked before the peer is looked at (and again this often while it
/// stays blocked and is not a zero window). Well inside [`crate::dial::PATH_DEAD_AFTER`], which
/// counts from when the window shut, a little before our writes block.
pub const STALL_CHECK: Duration = Duration::from_secs(5);

/// The timer code `/proc/net/tcp` shows for zero-window probing (`ICSK_TIME_PROBE0`).
#[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
const PROBE_TIMER: &str = "04";

/// Lifts the socket's TCP_USER_TIMEOUT if it has one and the kernel is probing a zero window on
/// it. Returns whether it did.
#[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
pub(crate) fn hold_on(stream: &TcpStream) -> bool {
    let sock = socket2::SockRef::from(stream);
    if !matches!(sock.tcp_user_timeout(), Ok(Some(_))) || !probing_zero_window(stream) {
        return false;
    }
    match sock.set_tcp_user_timeout(None) {
        Ok(()) => {
            tracing::debug!(
                "the peer takes no bytes but answers: waiting for it without the dead-path timeout"
            );
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "could not lift TCP_USER_TIMEOUT");
            false
        }
    }
}

/// Where the kernel has no TCP_USER_TIMEOUT there is nothing to lift.
#[cfg(not(any(target_os = "android", target_os = "fuchsia", target_os = "linux")))]
pub(crate) fn hold_on(_stream: &TcpStream) -> bool {
    false
}

/// Puts the dead-path timeout back after [`hold_on`].
pub(crate) fn stop_holding_on(stream: &TcpStream) {
    if let Err(e) = crate::dial::give_up_on_dead_path(stream) {
        tracing::debug!(error = %e, "could not restore TCP_USER_TIMEOUT");
    }
}

/// Whether the kernel runs its zero-window probe timer on this socket, found by the socket's
/// inode in `/proc/net/tcp6` and `/proc/net/tcp` (this process's network namespace).
#[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
fn probing_zero_window(stream: &TcpStream) -> bool {
    let Ok(stat) = rustix::fs::fstat(stream) else {
        return false;
    };
    let inode = stat.st_ino.to_string();
    // The first table that lists the socket answers; the other is not read.
    ["/proc/net/tcp6", "/proc/net/tcp"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            timer_of(&text, &inode).map(|t| t == PROBE_TIMER)
        })
        .unwrap_or(false)
}

/// The timer code (`tr` of `tr:tm->when`) of the socket with this inode in a `/proc/net/tcp`
/// table.
#[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
fn timer_of<'a>(table: &'a str, inode: &str) -> Option<&'a str> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(9) == Some(&inode)).then(|| f.get(5)?.split(':').next())?
    })
}

#[cfg(all(
    test,
    any(target_os = "android", target_os = "fuchsia", target_os = "linux")
))]
mod tests {
    use super::*;

    #[test]
    fn the_timer_column_is_read_for_the_right_socket() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 0100007F:D2A4 01 00000000:00000000 01:00000014 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n\
   1: 0100007F:1F91 0100007F:D2A5 01 002A0000:00000000 04:000001F4 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(timer_of(table, "4242"), Some("01"));
        assert_eq!(timer_of(table, "4343"), Some(PROBE_TIMER));
        assert_eq!(timer_of(table, "434"), None);
    }
}
