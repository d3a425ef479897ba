//! Turns parsed arguments into running forwards: connectors, listeners, the start-up lines,
//! signal handling and the graceful stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use forward_tunnel::{serve, Connector, DirectConnector, Lifecycle, Listener, LocalAddr, Remote};

use crate::cli::ClientOpts;
use crate::spec::{LocalSide, Spec};

/// One forward ready to serve: its listeners and its connector.
pub struct Bound<C> {
    /// Listeners with their real addresses.
    pub listeners: Vec<(Listener, LocalAddr)>,
    /// Opens the remote side.
    pub connector: Arc<C>,
}

/// Builds the direct-mode connector of a spec.
pub fn spec_connector(
    spec: &Spec,
    opts: &ClientOpts,
    tls: Arc<rustls::ClientConfig>,
) -> Result<DirectConnector> {
    if spec.via_target.is_some() {
        bail!(
            "forward spec '{}': 'vm/target' reaches another host from the VM and needs the agent (--agent PORT)",
            spec.text
        );
    }
    direct_connector(&spec.host, spec.rport, opts, tls)
}

/// Builds a direct-mode connector to `host` (VM id or name) and `port`.
pub fn direct_connector(
    host: &str,
    port: u16,
    opts: &ClientOpts,
    tls: Arc<rustls::ClientConfig>,
) -> Result<DirectConnector> {
    let remote = Remote {
        host: crate::spec::host_name(host, &opts.domain),
        port,
    };
    Ok(DirectConnector::new(
        remote,
        opts.edge.clone(),
        tls,
        Duration::from_secs(opts.connect_timeout),
    )?)
}

/// The shared TLS client config, with the CA file named in errors.
pub fn tls_config(opts: &ClientOpts) -> Result<Arc<rustls::ClientConfig>> {
    forward_tunnel::tls::client_config(opts.ca_file.as_deref(), &[]).map_err(|e| {
        // Named as the other variables are: the message blames --ca-file, which nobody typed.
        let origin = crate::env_origin("--ca-file", "FORWARD_CA_FILE").unwrap_or_default();
        anyhow::anyhow!("{e}{origin}")
    })
}

/// Binds every listener of a spec. With port 0 on several addresses, all get the same port,
/// which the OS picks on the first one.
pub fn bind(spec: &Spec) -> Result<Vec<(Listener, LocalAddr)>> {
    let ctx = || format!("forward spec '{}'", spec.text);
    match &spec.local {
        LocalSide::Unix(path) => {
            let l = Listener::bind(&LocalAddr::Unix(path.clone())).with_context(ctx)?;
            let a = l.local_addr()?;
            Ok(vec![(l, a)])
        }
        LocalSide::Tcp { addrs, port } => {
            let mut attempts = 0;
            loop {
                attempts += 1;
                match bind_all(addrs, *port) {
                    Ok(v) => return Ok(v),
                    // The picked port was free on one family only: pick again.
                    Err(forward_tunnel::ListenError::InUse { .. })
                        if *port == 0 && attempts < 10 =>
                    {
                        continue
                    }
                    Err(e) => return Err(e).with_context(ctx),
                }
            }
        }
    }
}

fn bind_all(
    addrs: &[std::net::IpAddr],
    port: u16,
) -> Result<Vec<(Listener, LocalAddr)>, forward_tunnel::ListenError> {
    // "Both loopbacks" means whichever this machine has: a container or host with IPv6
    // disabled has no [::1], and `ssh -L` then listens on 127.0.0.1 alone. An address the
    // user typed must bind or fail.
    let lenient = addrs == crate::spec::loopbacks().as_slice();
    let mut out: Vec<(Listener, LocalAddr)> = Vec::new();
    let mut port = port;
    let mut missing = None;
    for ip in addrs {
        let want = LocalAddr::Tcp(SocketAddr::new(*ip, port));
        let l = match Listener::bind(&want) {
            Ok(l) => l,
            Err(e) if lenient && family_unavailable(&e) => {
                missing = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let got = l
            .local_addr()
            .map_err(|source| forward_tunnel::ListenError::Other {
                addr: want.clone(),
                cause: source,
            })?;
        if let LocalAddr::Tcp(sa) = &got {
            port = sa.port();
        }
        out.push((l, got));
    }
    match missing {
        Some(e) if out.is_empty() => Err(e),
        Some(e) => {
            tracing::warn!("{e}; listening on the other loopback only");
            Ok(out)
        }
        None => Ok(out),
    }
}

/// The address family or the loopback address itself does not exist here (IPv6 disabled).
fn family_unavailable(e: &forward_tunnel::ListenError) -> bool {
    use forward_tunnel::ListenError;
    const EAFNOSUPPORT: i32 = if cfg!(target_os = "linux") { 97 } else { 47 };
    match e {
        ListenError::NotLocal { .. } => true,
        ListenError::Other { cause, .. } => cause.raw_os_error() == Some(EAFNOSUPPORT),
        _ => false,
    }
}

/// The line that says a listener is up: text for people, one JSON object for a script or a
/// log shipper (`--log-format json`), which needs the real port when 0 was asked and should
/// not have to parse prose. A Unix socket path may hold any character; JSON escapes it.
pub(crate) fn announce(json: bool, listen: &str, to: &str) {
    if json {
        let line = serde_json::json!({ "forwarding": { "listen": listen, "to": to } });
        crate::say::say!("{line}");
    } else {
        // A socket path may hold a newline, which split the line in two (a script reading
        // one line per listener then got a wrong path).
        crate::say::say!("forwarding {} -> {to}", crate::say::escape_controls(listen));
    }
}

/// Checks (if asked), prints the start-up lines, serves until SIGINT/SIGTERM, then stops
/// gracefully. Returns the process exit code.
///
/// The listeners are bound before the check, so that a port in use fails at once rather than
/// after the network checks; a client that connects meanwhile waits in the kernel's queue and
/// is served once the check passed. The signal handlers come first, so that a signal during
/// the check ends forward as it does later: listeners closed, Unix socket files removed (the
/// default action left them behind, a tester's finding).
pub async fn serve_all<C: Connector>(
    forwards: Vec<Bound<C>>,
    check: bool,
    grace: Duration,
    json: bool,
) -> Result<i32> {
    let mut signals = Signals::install()?;
    // ssh -L dies on SIGHUP (its terminal closed), and so do we, at once; but handled, so the
    // listeners close on the way out and a Unix socket's file is removed (the default action
    // left it behind). Installed before the start-up lines, as the others: a script that
    // signals once it read them must not meet the default action.
    let mut hangup = Hangup::install()?;
    if check {
        tokio::select! {
            r = check_all(&forwards) => r?,
            signal = signals.recv() => {
                // Not 0: the check did not pass, and a script must not read it as passed.
                tracing::info!("stopped during --check: nothing was served");
                return Ok(128 + signal);
            }
            _ = hangup.recv() => return Ok(128 + 1),
        }
    }
    let mut life = Lifecycle::default();
    // On the default one thread, a connection accepted while a transfer keeps that thread busy
    // goes to a spare one (forward_tunnel::spare); a multi-thread runtime spreads them itself.
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::CurrentThread
    {
        life.spare = Some(Arc::new(forward_tunnel::spare::Spare::new()));
    }
    let mut tasks = Vec::new();
    for f in forwards {
        let label: Arc<str> = f.connector.describe().into();
        for (listener, addr) in f.listeners {
            announce(json, &addr.to_string(), &label);
            tasks.push(tokio::spawn(serve(
                listener,
                f.connector.clone(),
                label.clone(),
                life.clone(),
            )));
        }
    }
    if signals.recv_or_hangup(&mut hangup).await {
        tracing::info!("SIGHUP: resetting open connections and exiting");
        life.shutdown(Duration::ZERO).await;
        for t in tasks {
            t.await?;
        }
        // What a shell reports for a process the signal killed.
        return Ok(128 + 1);
    }
    tracing::info!(
        "stopping: no new connections (a second signal, Ctrl-C or SIGTERM, resets open ones at once)"
    );
    // As with most servers, an impatient second signal means "now", not "after the grace".
    // So does SIGHUP (Ctrl-C, then the terminal closed): nobody is left to wait for the grace
    // period, and a forward lingering unseen for up to --grace is what a tester found.
    let (reset, when, code) = tokio::select! {
        reset = life.shutdown(grace) => (reset, "after the grace period", 0),
        _ = signals.recv() => {
            tracing::info!("second signal: resetting open connections now");
            (life.shutdown(Duration::ZERO).await, "at the second signal", 0)
        }
        () = hangup.recv() => {
            tracing::info!("SIGHUP: resetting open connections and exiting");
            (life.shutdown(Duration::ZERO).await, "at SIGHUP", 128 + 1)
        }
    };
    for t in tasks {
        t.await?;
    }
    if reset > 0 {
        tracing::warn!(reset, "connections were reset {when}");
    }
    Ok(code)
}

/// SIGINT and SIGTERM handlers. Install them before announcing anything: a supervisor that
/// sends SIGTERM right after reading our first line must get a graceful stop, not the default
/// action (death).
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs both handlers.
    pub fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Resolves on the first SIGINT or SIGTERM, with its number.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => 2,
            _ = self.term.recv() => 15,
        }
    }

    /// Resolves on the first SIGINT or SIGTERM (`false`: stop gracefully) or SIGHUP (`true`:
    /// the terminal is gone, stop at once), as `forward` and the demo both stop.
    pub async fn recv_or_hangup(&mut self, hangup: &mut Hangup) -> bool {
        tokio::select! {
            _ = self.recv() => false,
            () = hangup.recv() => true,
        }
    }
}

/// `--check`: every target at once, every failure reported.
async fn check_all<C: Connector>(forwards: &[Bound<C>]) -> Result<()> {
    // At once, not one after another: a direct check listens a moment after its handshake.
    let checks: Vec<_> = forwards
        .iter()
        .map(|f| {
            let c = f.connector.clone();
            tokio::spawn(async move { c.check().await })
        })
        .collect();
    // Every failure is reported, not only the first: fixing one target at a time and
    // running again to learn of the next would waste the user's time.
    let mut failed = Vec::new();
    for (f, check) in forwards.iter().zip(checks) {
        match check.await.context("check task")? {
            Ok(()) => tracing::info!("check ok: {}", f.connector.describe()),
            Err(e) => failed.push(
                anyhow::Error::new(e)
                    .context(format!("check of {} failed", f.connector.describe())),
            ),
        }
    }
    match failed.len() {
        0 => {}
        1 => return Err(failed.remove(0)),
        n => {
            let all: Vec<String> = failed.iter().map(|e| format!("{e:#}")).collect();
            anyhow::bail!(
                "{n} of {} checks failed: {}",
                forwards.len(),
                all.join("; ")
            );
        }
    }
    Ok(())
}

/// SIGHUP, unless the process started with it ignored. `nohup` (and some supervisors) start a
/// program with SIGHUP ignored so that it outlives the terminal; installing a handler replaced
/// that, and `nohup forward agent &` died with the ssh session that started it (a tester's
/// finding). As with any Unix program, an ignored SIGHUP then stays ignored, and [`recv`]
/// never resolves.
///
/// [`recv`]: Hangup::recv
pub struct Hangup(Option<tokio::signal::unix::Signal>);

impl Hangup {
    /// Installs the handler, unless SIGHUP is ignored.
    pub fn install() -> Result<Self> {
        if hangup_ignored() {
            tracing::debug!("SIGHUP is ignored (nohup?): it stays ignored");
            return Ok(Self(None));
        }
        let s = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        Ok(Self(Some(s)))
    }

    /// Resolves on SIGHUP; never, when it is ignored.
    pub async fn recv(&mut self) {
        match &mut self.0 {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// Whether this process started with SIGHUP ignored, read from `/proc/self/status` (its
/// `SigIgn` mask; SIGHUP is bit 0), which needs no unsafe code. Elsewhere (macOS has no
/// /proc) `false`: SIGHUP is handled as before.
fn hangup_ignored() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    ignored_mask_has_hangup(&status)
}

fn ignored_mask_has_hangup(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & 1 != 0)
}

/// Parses `HOST:PORT` for `forward stdio`.
pub fn parse_host_port(s: &str) -> Result<(String, u16)> {
    // As a SPEC is read (a tester found the two readers disagreeing): surrounding blanks
    // trimmed, IPv6 in brackets, digits only in the port, the trailing dot named.
    let s = s.trim();
    const FORM: &str = "expected HOST:PORT, e.g. abc123:443 or abc123.vm.vers.sh:443";
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("invalid target '{s}': {FORM}"))?;
    if host.is_empty() {
        anyhow::bail!("invalid target '{s}': the host is empty; {FORM}");
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        if host.parse::<std::net::Ipv6Addr>().is_ok() {
            anyhow::bail!(
                "invalid target '{s}': an IPv6 address goes in brackets, e.g. [fd00::5]:22"
            );
        }
        anyhow::bail!("invalid target '{s}': one ':' too many; {FORM}");
    }
    let ok = crate::spec::valid_host(host) || host.parse::<std::net::Ipv4Addr>().is_ok();
    if !ok {
        let hint = crate::spec::trailing_dot_hint(host);
        anyhow::bail!(
            "invalid target '{s}': '{host}' is not a VM id, host name or IP address{hint}; {FORM}"
        );
    }
    let port = crate::spec::port_number(port)
        .filter(|p| *p != 0)
        .ok_or_else(|| anyhow::anyhow!("invalid target '{s}': port '{port}' is not 1-65535"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::{ignored_mask_has_hangup, parse_host_port};
    use crate::say::escape_controls;

    /// A socket path with a newline no longer splits its `forwarding` line, nor a SPEC with
    /// one its error.
    #[test]
    fn control_characters_are_shown_escaped_on_one_line() {
        assert_eq!(escape_controls("/tmp/a b.sock"), "/tmp/a b.sock");
        assert_eq!(escape_controls("/tmp/żółw.sock"), "/tmp/żółw.sock");
        assert_eq!(escape_controls("/tmp/a\nb.sock"), "/tmp/a\\nb.sock");
        assert_eq!(
            escape_controls("tab\there\u{1b}[31m"),
            "tab\\there\\u{1b}[31m"
        );
    }

    /// `forward stdio`'s target is read as a SPEC's host and port are.
    #[test]
    fn stdio_targets_are_read_as_spec_hosts_are() {
        let ok = |t: &str| parse_host_port(t).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert_eq!(ok("vm1:22"), ("vm1".to_owned(), 22));
        assert_eq!(ok(" vm1:22 "), ("vm1".to_owned(), 22));
        assert_eq!(ok("[::1]:22"), ("::1".to_owned(), 22));
        assert_eq!(ok("10.0.0.5:22"), ("10.0.0.5".to_owned(), 22));
        assert_eq!(ok("abc.vm.vers.sh:443"), ("abc.vm.vers.sh".to_owned(), 443));
        let bad = |t: &str, needle: &str| {
            let e = parse_host_port(t).expect_err(t).to_string();
            assert!(e.contains(needle), "{t}: {e:?} should contain {needle:?}");
        };
        bad("vm1:+22", "port '+22' is not 1-65535");
        bad("vm1:0", "port '0' is not 1-65535");
        bad("::1:22", "an IPv6 address goes in brackets");
        bad("vm1.:22", "(drop the trailing dot)");
        bad("vm1", "expected HOST:PORT");
        bad("vm1:80:90", "one ':' too many");
        bad(":22", "the host is empty");
        bad("a b:22", "'a b' is not a VM id");
    }

    #[test]
    fn sighup_is_bit_zero_of_the_ignored_mask() {
        let status = |mask: &str| {
            format!("Name:\tforward\nSigBlk:\t0000000000000001\nSigIgn:\t{mask}\nSigCgt:\t0000000180004002\n")
        };
        assert!(ignored_mask_has_hangup(&status("0000000000000001")));
        assert!(ignored_mask_has_hangup(&status("0000000000001001")));
        // SIGINT (bit 1) and SIGPIPE (bit 12, which Rust ignores) are not SIGHUP.
        assert!(!ignored_mask_has_hangup(&status("0000000000001002")));
        assert!(!ignored_mask_has_hangup("Name:\tforward\n"));
        assert!(!ignored_mask_has_hangup(&status("garbage")));
    }
}
