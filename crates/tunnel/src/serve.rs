//! The accept loop of one forward: every accepted local connection gets its own task that opens
//! a remote stream through the forward's [`Connector`] and relays until both directions end.
//!
//! ```text
//! Listener ──accept──► task: Connector::connect ──► relay(local, remote) ──► log outcome
//!     ▲ stop (SIGINT/SIGTERM): no more accepts        ▲ abort (grace over): reset the local side
//! ```
//!
//! A failing connection is logged with its forward and never disturbs the others.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::dial::Connector;
use crate::listen::{Listener, LocalStream};
use crate::relay::{relay, Endpoint};

/// Shared lifecycle of all forwards of a process.
#[derive(Clone, Default)]
pub struct Lifecycle {
    /// Cancelled on SIGINT/SIGTERM: listeners stop accepting.
    pub stop: CancellationToken,
    /// Cancelled when the grace period is over: open connections are reset.
    pub abort: CancellationToken,
    /// Tracks open connections so shutdown can wait for them.
    pub tracker: TaskTracker,
}

impl Lifecycle {
    /// Stops accepting, waits up to `grace` for open connections, then resets the rest.
    /// Returns how many connections had to be reset.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.stop.cancel();
        self.tracker.close();
        let open = self.tracker.len();
        if open > 0 {
            tracing::info!(open, ?grace, "waiting for open connections to finish");
        }
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.tracker.len();
        tracing::warn!(left, "grace period over, resetting connections still open");
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
    loop {
        let accepted = tokio::select! {
            _ = life.stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let span = tracing::debug_span!("conn", forward = %label, %peer);
                life.tracker.spawn(
                    handle(stream, connector.clone(), label.clone(), life.abort.clone())
                        .instrument(span),
                );
            }
            Err(e) => {
                // Out of descriptors or a connection that died in the backlog: keep serving,
                // but do not spin.
                tracing::warn!(forward = %label, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!(forward = %label, "listener closed");
}

async fn handle<C: Connector>(
    local: LocalStream,
    connector: Arc<C>,
    label: Arc<str>,
    abort: CancellationToken,
) {
    let reset = local.abort_handle();
    let work = async {
        let remote = match connector.connect().await {
            Ok(r) => r,
            Err(e) => {
                // The local client must not mistake a failed forward for an empty answer.
                local.abort();
                return Err(e.to_string());
            }
        };
        tracing::debug!("connected");
        relay(local, remote).await.map_err(|e| e.to_string())
    };
    tokio::select! {
        r = work => match r {
            Ok(stats) => tracing::debug!(up = stats.a_to_b, down = stats.b_to_a, "closed"),
            Err(e) => tracing::warn!(forward = %label, "connection failed: {e}"),
        },
        _ = abort.cancelled() => {
            if let Some(h) = reset {
                h.abort();
            }
            tracing::warn!(forward = %label, "connection reset at shutdown");
        }
    }
}
