//! The tokio side of forward: TLS configuration, local listeners, dialers, the relay and the
//! accept loop that ties them together.
//!
//! ```text
//!  local client ──► Listener ──► serve() ──► Connector::connect() ──► remote stream
//!                                   │                                   (TLS to the edge,
//!                                   └──────── relay(local, remote) ◄──── or an agent stream)
//! ```
//!
//! What it leaves to others: the wire protocol of the agent carrier lives in `forward-mux`
//! (sans-IO), command-line parsing and user-facing output in the `forward` binary, the local
//! edge imitation in `forward-edge`.

mod admission;
pub mod agent;
pub mod agent_client;
pub mod auth;
pub mod carrier;
pub mod dial;
pub mod limits;
pub mod listen;
pub mod policy;
pub mod readahead;
pub mod relay;
pub mod serve;
pub mod spare;
pub mod stdio;
mod throttle;
pub mod tls;
pub mod upgrade;
pub mod zero_window;

/// Reads at most `max + 1` bytes of the file at `path`: more than `max` tells the caller it is
/// not the file it asked for (`/dev/zero`, a disk image) before it fills memory. Any file that
/// reads, a pipe from the shell (`<(pass show t)`) as well as a regular file.
pub(crate) fn read_at_most(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

pub use dial::{Connector, DialError, DirectConnector, Remote};
pub use listen::{DetachedStream, ListenError, Listener, LocalAddr, LocalStream};
pub use relay::{relay, Endpoint, RelayError, RelayStats};
pub use serve::{serve, Lifecycle};
pub mod quic;
