//! A local imitation of the Vers edge, for tests, the demo and the bench harness.
//!
//! The real edge terminates TLS for `{vm}.vm.vers.sh:{port}` and continues as plain TCP to the
//! same port on the VM over IPv6. This crate does the same on loopback:
//!
//! ```text
//!  client ──TLS (SNI vm1.vm.vers.sh)──► 127.0.0.1:PORT ─┐ edge: certificate for *.vm.vers.sh,
//!                                                       │ SNI → VM, unknown names refused
//!                                                       └──TCP──► [::1]:VMPORT (the "VM")
//! ```
//!
//! Bytes are moved by [`forward_tunnel::relay::relay`], so half-close passes through both ways
//! (as nginx does with `proxy_half_close on`); [`EdgeConfig::half_close`] `= false` imitates an
//! edge without it. [`EdgeConfig::abort_after_bytes`] injects a mid-transfer reset.
//!
//! Left to others: every VM name maps to the same `vm_addr` (one machine plays all VMs); no
//! rate limits, no HTTP, no ACME. It is a test fixture, not a production proxy.

mod ca;
mod cli;
mod conn;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use ca::{CaSource, TestCa, CA_CERT_FILE, CA_KEY_FILE};
pub use cli::{run, EdgeArgs};

/// The domain the Vers edge serves VMs under.
pub const DEFAULT_DOMAIN: &str = "vm.vers.sh";

/// One listening port and the VM port it leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    /// Port to listen on; 0 picks a free one (see [`RunningEdge::listeners`]).
    pub listen: u16,
    /// VM port to connect to; `None` means the same number as the port actually listened on.
    pub vm: Option<u16>,
}

impl PortMap {
    /// Listen on `port` and connect to the same port on the VM, as the Vers edge does.
    pub fn same(port: u16) -> Self {
        Self {
            listen: port,
            vm: None,
        }
    }

    /// Listen on `listen` (0 = any free port) and connect to `vm` on the VM.
    pub fn to(listen: u16, vm: u16) -> Self {
        Self {
            listen,
            vm: Some(vm),
        }
    }
}

impl From<u16> for PortMap {
    fn from(port: u16) -> Self {
        Self::same(port)
    }
}

impl FromStr for PortMap {
    type Err = String;

    /// `PORT` or `LISTEN:VMPORT` (e.g. `8443`, `0:5432`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str, what: &str| {
            p.parse::<u16>().map_err(|_| {
                format!("{what} {p:?} in {s:?} is not a port number (0-65535); expected PORT or LISTEN:VMPORT, e.g. 8443 or 0:5432")
            })
        };
        match s.split_once(':') {
            None => Ok(Self::same(port(s, "port")?)),
            Some((l, v)) => {
                let vm = port(v, "VM port")?;
                if vm == 0 {
                    return Err(format!(
                        "VM port 0 in {s:?} cannot be connected to; give the port the VM service listens on"
                    ));
                }
                Ok(Self::to(port(l, "listen port")?, vm))
            }
        }
    }
}

/// How the local edge is set up.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Names under this domain are routed (`{vm}.{domain}`); default `vm.vers.sh`.
    pub domain: String,
    /// Ports to listen on.
    pub ports: Vec<PortMap>,
    /// Address to listen on; default 127.0.0.1.
    pub bind: IpAddr,
    /// Where every VM lives; default `::1` (IPv6, as at Vers).
    pub vm_addr: IpAddr,
    /// Where the CA comes from; default a fresh one in memory.
    pub ca: CaSource,
    /// Pass a half-close through (default). When false, the first EOF from either side ends
    /// both directions, like nginx's stream proxy without `proxy_half_close`.
    pub half_close: bool,
    /// Fault injection for tests: once this many bytes (both directions together) have been
    /// relayed on a connection, reset both of its sides.
    pub abort_after_bytes: Option<u64>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            domain: DEFAULT_DOMAIN.to_string(),
            ports: Vec::new(),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            vm_addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
            ca: CaSource::Ephemeral,
            half_close: true,
            abort_after_bytes: None,
        }
    }
}

impl EdgeConfig {
    /// Defaults with these ports.
    pub fn with_ports(ports: impl IntoIterator<Item = impl Into<PortMap>>) -> Self {
        Self {
            ports: ports.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

/// Why the edge could not start. Each message is complete on its own (no `source()` chain to
/// print after it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EdgeError {
    /// The configuration cannot work (no ports, bad domain, ...).
    #[error("edge configuration: {0}")]
    Config(String),
    /// A listening socket could not be opened.
    #[error("cannot listen on {addr}: {error}{}", bind_hint(error))]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        error: io::Error,
    },
    /// A CA file or directory could not be read or written.
    #[error("cannot {action} {}: {error}", path.display())]
    CaFile {
        /// The file or directory.
        path: PathBuf,
        /// What was tried ("read", "write", "create directory").
        action: &'static str,
        /// Why.
        error: io::Error,
    },
    /// The CA directory holds something unusable.
    #[error("CA in {}: {reason}", path.display())]
    CaInvalid {
        /// The file or directory at fault.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Generating a key or certificate failed.
    #[error("generating a certificate: {0}")]
    Certificate(rcgen::Error),
    /// rustls refused the generated certificate.
    #[error("TLS configuration: {0}")]
    Tls(rustls::Error),
    /// Waiting for Ctrl-C failed (only from [`run`]).
    #[error("waiting for Ctrl-C: {0}")]
    Signal(io::Error),
}

fn bind_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => {
            " (the port is taken: pick another --port, or 0 for any free port)"
        }
        io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need privileges: pick a port of 1024 or more)"
        }
        io::ErrorKind::AddrNotAvailable => {
            " (that address is not on this machine: use --bind 127.0.0.1)"
        }
        _ => "",
    }
}

/// Counters of what the edge did, for tests and the bench.
#[derive(Debug, Default)]
pub struct EdgeCounters {
    /// TCP connections accepted.
    pub accepted: AtomicU64,
    /// Handshakes refused because the SNI names no VM under the domain.
    pub refused_sni: AtomicU64,
    /// TLS handshakes that failed for another reason (client distrusts us, garbage, ...).
    pub handshake_failed: AtomicU64,
    /// Connections reset because the VM port could not be reached.
    pub backend_failed: AtomicU64,
    /// Relays that ended cleanly.
    pub relayed_ok: AtomicU64,
    /// Relays that ended with an error (both sides reset).
    pub relay_errors: AtomicU64,
}

impl EdgeCounters {
    /// Read one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One port the edge listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// The address actually bound (the real port when 0 was asked).
    pub addr: SocketAddr,
    /// Where connections to it go on the VM side.
    pub vm: SocketAddr,
}

/// The local edge.
#[derive(Debug)]
pub struct Edge;

impl Edge {
    /// Bind every port, load or make the CA, and start serving in the background.
    pub async fn start(config: EdgeConfig) -> Result<RunningEdge, EdgeError> {
        let domain = normalize_domain(&config.domain)?;
        if config.ports.is_empty() {
            return Err(EdgeError::Config(
                "no port to listen on: give at least one, e.g. --port 8443 or --port 0:5432"
                    .to_string(),
            ));
        }
        // Named here: binding the second would fail with "in use", blaming another program.
        for (i, a) in config.ports.iter().enumerate() {
            if a.listen != 0 && config.ports[..i].iter().any(|b| b.listen == a.listen) {
                return Err(EdgeError::Config(format!(
                    "port {} is given twice: give each listening port once",
                    a.listen
                )));
            }
        }
        let (ca, ca_path) = match &config.ca {
            CaSource::Ephemeral => (Arc::new(TestCa::generate()?), None),
            CaSource::Dir(dir) => (
                Arc::new(TestCa::load_or_create(dir)?),
                Some(dir.join(CA_CERT_FILE)),
            ),
            CaSource::Provided(ca) => (ca.clone(), None),
        };
        let wildcard = format!("*.{domain}");
        let (chain, key) = ca.try_issue(&[&wildcard, &domain])?;
        let tls = conn::server_config(chain, key)?;

        let mut bound = Vec::new();
        for map in &config.ports {
            let addr = SocketAddr::new(config.bind, map.listen);
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|error| EdgeError::Bind { addr, error })?;
            let local = listener
                .local_addr()
                .map_err(|error| EdgeError::Bind { addr, error })?;
            let vm = SocketAddr::new(config.vm_addr, map.vm.unwrap_or(local.port()));
            bound.push((listener, Listener { addr: local, vm }));
        }

        let counters = Arc::new(EdgeCounters::default());
        let shared = Arc::new(conn::Shared {
            domain,
            tls,
            half_close: config.half_close,
            abort_after_bytes: config.abort_after_bytes,
            counters: counters.clone(),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let listeners: Vec<Listener> = bound.iter().map(|(_, l)| *l).collect();
        let tasks = bound
            .into_iter()
            .map(|(listener, info)| {
                tokio::spawn(conn::serve(listener, info, shared.clone(), stop_rx.clone()))
            })
            .collect();
        for l in &listeners {
            tracing::info!(listen = %l.addr, vm = %l.vm, domain = %shared.domain, "edge listening");
        }
        Ok(RunningEdge {
            listeners,
            domain: shared.domain.clone(),
            ca,
            ca_path,
            counters,
            stop: stop_tx,
            tasks,
        })
    }
}

/// A started edge. Dropping it stops the listeners and drops open connections abruptly (no
/// close_notify: clients see a truncated TLS stream, as when an edge process dies).
#[derive(Debug)]
pub struct RunningEdge {
    listeners: Vec<Listener>,
    domain: String,
    ca: Arc<TestCa>,
    ca_path: Option<PathBuf>,
    counters: Arc<EdgeCounters>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningEdge {
    /// Every listener, in the order of [`EdgeConfig::ports`].
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// The address of the first listener.
    pub fn addr(&self) -> SocketAddr {
        self.listeners[0].addr
    }

    /// The domain served, normalized (lower case, no trailing dot).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The TLS name a client uses for `vm` (`{vm}.{domain}`).
    pub fn host_for(&self, vm: &str) -> String {
        format!("{vm}.{}", self.domain)
    }

    /// The CA certificate that clients must trust, in PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.ca_pem()
    }

    /// The CA itself (to build client configurations or issue more certificates).
    pub fn ca(&self) -> &Arc<TestCa> {
        &self.ca
    }

    /// Path of `ca.pem` when the CA lives in a directory.
    pub fn ca_path(&self) -> Option<&std::path::Path> {
        self.ca_path.as_deref()
    }

    /// What the edge has done so far.
    pub fn counters(&self) -> &EdgeCounters {
        &self.counters
    }

    /// Listening port → VM port, for printing.
    pub fn port_map(&self) -> HashMap<u16, u16> {
        self.listeners
            .iter()
            .map(|l| (l.addr.port(), l.vm.port()))
            .collect()
    }

    /// Stop accepting, drop open connections abruptly, and wait until every listener has ended.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for RunningEdge {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Lower-case, strip one trailing dot, and check it looks like a DNS name.
fn normalize_domain(domain: &str) -> Result<String, EdgeError> {
    let d = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let valid = !d.is_empty()
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(d)
    } else {
        Err(EdgeError::Config(format!(
            "domain {domain:?} is not a DNS name; expected something like vm.vers.sh"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_maps_parse() {
        assert_eq!("8443".parse::<PortMap>().unwrap(), PortMap::same(8443));
        assert_eq!("0:5432".parse::<PortMap>().unwrap(), PortMap::to(0, 5432));
        for bad in ["", "x", "70000", "1:0", "1:2:3", ":5"] {
            let err = bad.parse::<PortMap>().unwrap_err();
            assert!(err.contains(bad), "{bad:?}: {err}");
        }
    }

    #[test]
    fn domains_are_normalized_or_refused() {
        assert_eq!(normalize_domain("VM.Vers.sh.").unwrap(), "vm.vers.sh");
        for bad in ["", ".", "a..b", "a b", "*.x"] {
            assert!(normalize_domain(bad).is_err(), "{bad:?}");
        }
    }
}
