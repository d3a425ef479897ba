//! One listener's accept loop and the life of one edge connection: handshake, route, relay.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use forward_tunnel::relay::{relay, Endpoint};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::LazyConfigAcceptor;

use crate::{EdgeCounters, EdgeError, Listener};

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the edge waits for the VM port to accept.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Shared {
    pub(crate) domain: String,
    pub(crate) tls: Arc<ServerConfig>,
    pub(crate) half_close: bool,
    pub(crate) abort_after_bytes: Option<u64>,
    pub(crate) counters: Arc<EdgeCounters>,
}

pub(crate) fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, EdgeError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(EdgeError::Tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(EdgeError::Tls)?;
    // Stateless tickets, so clients that share one ClientConfig resume sessions as with a real edge.
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(EdgeError::Tls)?;
    Ok(Arc::new(config))
}

/// A configuration that has no certificate for anyone: rustls answers the client with a
/// handshake-failure alert. Used for names the edge does not serve.
fn refusing_config() -> Arc<ServerConfig> {
    #[derive(Debug)]
    struct NoCertificate;
    impl ResolvesServerCert for NoCertificate {
        fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            None
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCertificate));
    Arc::new(config)
}

pub(crate) async fn serve(
    listener: TcpListener,
    info: Listener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let refuse = refusing_config();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            // A stop signal or a dropped RunningEdge: leave, and dropping `conns` closes every
            // open connection.
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    conns.spawn(handle(tcp, peer, info, shared.clone(), refuse.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listen = %info.addr, error = %e, "edge: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    tracing::debug!(listen = %info.addr, open = conns.len(), "edge listener stopped");
}

/// The VM label of `sni` if it is `{label}.{domain}` with a single DNS label.
fn vm_name<'a>(sni: &'a str, domain: &str) -> Option<&'a str> {
    let label = sni.strip_suffix(domain)?.strip_suffix('.')?;
    let ok = !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    ok.then_some(label)
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    info: Listener,
    shared: Arc<Shared>,
    refuse: Arc<ServerConfig>,
) {
    let counters = &shared.counters;
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        // rustls lower-cases the SNI it reports.
        let sni = start.client_hello().server_name().map(str::to_owned);
        let vm = sni
            .as_deref()
            .and_then(|s| vm_name(s, &shared.domain))
            .map(str::to_owned);
        match vm {
            Some(vm) => Ok::<_, io::Error>(Ok((start.into_stream(shared.tls.clone()).await?, vm))),
            None => {
                // Finish with an alert: the client learns "handshake failure", not a dropped socket.
                let _ = start.into_stream(refuse).await;
                Ok(Err(sni))
            }
        }
    };
    let (tls, vm) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(Ok(done))) => done,
        Ok(Ok(Err(sni))) => {
            counters.refused_sni.fetch_add(1, Ordering::Relaxed);
            match sni {
                Some(sni) => tracing::warn!(
                    %peer, listen = %info.addr,
                    "edge: refused TLS handshake for {sni:?}: not a VM name under {}", shared.domain
                ),
                None => tracing::warn!(
                    %peer, listen = %info.addr,
                    "edge: refused TLS handshake without SNI: clients must name a VM ({{vm}}.{})",
                    shared.domain
                ),
            }
            return;
        }
        Ok(Err(e)) => {
            counters.handshake_failed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, listen = %info.addr, error = %e, "edge: TLS handshake failed");
            return;
        }
        Err(_) => {
            counters.handshake_failed.fetch_add(1, Ordering::Relaxed);
            // A port scan or a flood of silent connections would be a line each at INFO.
            tracing::debug!(%peer, listen = %info.addr, "edge: TLS handshake timed out");
            return;
        }
    };

    let backend = match tokio::time::timeout(BACKEND_TIMEOUT, TcpStream::connect(info.vm)).await {
        Ok(Ok(s)) => s,
        failed => {
            counters.backend_failed.fetch_add(1, Ordering::Relaxed);
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {}s", BACKEND_TIMEOUT.as_secs()),
            };
            tracing::warn!(
                %peer, vm = %vm, backend = %info.vm,
                "edge: cannot reach the VM port ({why}); resetting the client connection"
            );
            tls.abort();
            return;
        }
    };
    let _ = backend.set_nodelay(true);
    tracing::debug!(%peer, vm = %vm, backend = %info.vm, "edge: relaying");

    let teardown = (!shared.half_close).then(|| Arc::new(AtomicBool::new(false)));
    let fault = shared.abort_after_bytes.map(|limit| {
        Arc::new(Fault {
            limit,
            seen: AtomicU64::new(0),
        })
    });
    let client = Side {
        inner: tls,
        teardown: teardown.clone(),
        fault: fault.clone(),
    };
    let backend = Side {
        inner: backend,
        teardown,
        fault,
    };
    match relay(client, backend).await {
        Ok(stats) => {
            counters.relayed_ok.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, vm = %vm, up = stats.a_to_b, down = stats.b_to_a, "edge: connection done");
        }
        Err(e) => {
            counters.relay_errors.fetch_add(1, Ordering::Relaxed);
            // a = client, b = VM.
            tracing::info!(%peer, vm = %vm, "edge: connection reset (a = client, b = VM): {e}");
        }
    }
}

/// Shared by both sides of one connection when fault injection is on.
struct Fault {
    limit: u64,
    seen: AtomicU64,
}

/// An edge-side endpoint with the two test behaviours layered on the relay.
struct Side<T> {
    inner: T,
    /// Without half-close: set once either direction has ended; every read then reports EOF,
    /// so the first EOF ends both directions (nginx without `proxy_half_close`).
    teardown: Option<Arc<AtomicBool>>,
    fault: Option<Arc<Fault>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Side<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(f) = &this.fault {
            if f.seen.load(Ordering::Relaxed) >= f.limit {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("edge fault injection: reset after {} bytes", f.limit),
                )));
            }
        }
        if let Some(t) = &this.teardown {
            if t.load(Ordering::Relaxed) {
                return Poll::Ready(Ok(()));
            }
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some(f) = &this.fault {
            let n = (buf.filled().len() - before) as u64;
            f.seen.fetch_add(n, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Side<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
        if let Some(t) = &this.teardown {
            t.store(true, Ordering::Relaxed);
            // The other direction may be parked on a read of its own socket: poll it again so
            // it sees the teardown.
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: Endpoint> Endpoint for Side<T> {
    fn abort(&self) {
        self.inner.abort();
    }

    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.inner.poll_reset(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::vm_name;

    #[test]
    fn only_single_labels_under_the_domain_are_vms() {
        assert_eq!(vm_name("vm1.vm.vers.sh", "vm.vers.sh"), Some("vm1"));
        assert_eq!(vm_name("a-b-0.vm.vers.sh", "vm.vers.sh"), Some("a-b-0"));
        for bad in [
            "vm.vers.sh",
            ".vm.vers.sh",
            "a.b.vm.vers.sh",
            "vm1xvm.vers.sh",
            "vm1.vm.vers.sh.evil",
            "vm1.other.sh",
        ] {
            assert_eq!(vm_name(bad, "vm.vers.sh"), None, "{bad}");
        }
    }
}
