//! Which targets the agent may dial for a client, and the dialling itself.
//!
//! Default: the VM's loopback only (`localhost`, `::1`, `127.0.0.1`, or the empty host), raced
//! `::1` first, `127.0.0.1` beside it (Happy Eyeballs, [`race`]), so IPv4-only services are
//! reachable too, however `::1` fails. `--allow HOST:PORT` patterns (`*` for any host or port,
//! `*.suffix` for a domain) widen it deliberately.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::dial::{race, tune_tcp};

/// A malformed `--allow` pattern: the pattern, what is wrong with it, and the expected form.
#[derive(Debug, thiserror::Error)]
#[error("invalid --allow pattern '{pattern}': {problem}; expected HOST:PORT, e.g. db.internal:5432, 10.0.0.5:*, [fd00::5]:5432, *.internal:443 or *:*")]
pub struct PolicyError {
    pattern: String,
    problem: String,
}

/// What is wrong with the host part of a pattern that is neither a name nor an address.
fn host_problem(h: &str) -> String {
    if h.contains('/') {
        format!("'{h}' looks like a range; list each host, or allow * (any host)")
    } else if h.contains('*') {
        format!("'{h}': '*' stands only alone or as the first label ('*.internal')")
    } else if h.ends_with('.') {
        format!("'{h}' ends with a dot; write it without")
    } else {
        format!("'{h}' is not a host name or IP address")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    Suffix(String),
    Exact(String),
    /// Compared as an address, so `fd00::9` and `fd00:0::9` (or `::ffff:10.0.0.5` and
    /// `10.0.0.5`) are one target.
    Ip(IpAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Allow {
    host: HostPattern,
    port: Option<u16>,
}

/// Why the agent would not or could not reach a target; mapped to a reset code on the wire.
#[derive(Debug, thiserror::Error)]
pub enum DialRefusal {
    /// Not on the allow list.
    #[error(
        "target {0} is not allowed by the agent (only the VM's loopback unless --allow widens it)"
    )]
    NotAllowed(String),
    /// Nothing listening.
    #[error("connection refused by {0}")]
    Refused(String),
    /// No answer within the dial deadline.
    #[error("dialling {0} timed out")]
    Timeout(String),
    /// Name or route problem.
    #[error("cannot reach {0}: {1}")]
    Unreachable(String, io::Error),
}

/// The agent's target policy.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    allow: Vec<Allow>,
}

/// A target host without the brackets an IPv6 literal may carry.
fn unbracketed(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The VM's own loopback by name: no host (a SPEC's `vm:port`) or `localhost`.
fn names_localhost(h: &str) -> bool {
    h.is_empty() || h.eq_ignore_ascii_case("localhost")
}

/// A DNS name: dot-separated labels of letters, digits, '-' and '_', no label starting or
/// ending with '-' (also how SPECs check their host names; a TLS name must pass too).
pub fn is_name(h: &str) -> bool {
    h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

impl TargetPolicy {
    /// Parses `--allow` patterns.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, PolicyError> {
        let mut allow = Vec::new();
        for p in patterns {
            let p = p.as_ref();
            let bad = |problem: String| PolicyError {
                pattern: p.to_owned(),
                problem,
            };
            let (host, port) = p
                .rsplit_once(':')
                .ok_or_else(|| bad("no port (':*' allows every port)".into()))?;
            let port = match port {
                "*" => None,
                // Digits only: `u16::from_str` also takes a sign ("+22").
                n => Some(
                    n.parse::<u16>()
                        .ok()
                        .filter(|v| *v != 0 && n.bytes().all(|b| b.is_ascii_digit()))
                        .ok_or_else(|| bad(format!("port '{n}' is not 1-65535 or *")))?,
                ),
            };
            if host.contains("://") {
                return Err(bad(format!("'{host}' is a URL; give the host alone")));
            }
            let bracketed = host.starts_with('[') && host.ends_with(']');
            if host.contains(':') && !bracketed {
                // `2001:db8::1:22` is also a whole address without a port: say which is meant.
                return Err(bad(
                    "an IPv6 address goes in brackets, e.g. [fd00::5]:5432".into()
                ));
            }
            let host = unbracketed(host);
            let host = match host {
                "" => return Err(bad("the host is empty ('*' allows every host)".into())),
                "*" => HostPattern::Any,
                h if h.starts_with("*.") && is_name(&h[2..]) => {
                    HostPattern::Suffix(h[1..].to_ascii_lowercase())
                }
                // Anything else must be one host: `10.0.0.0/8` or `http://db` would be taken for
                // a name no target ever has, and the allowance would silently never apply.
                h => match h.parse::<IpAddr>() {
                    Ok(ip) => HostPattern::Ip(ip.to_canonical()),
                    Err(_) if is_name(h) => HostPattern::Exact(h.to_ascii_lowercase()),
                    Err(_) => return Err(bad(host_problem(h))),
                },
            };
            allow.push(Allow { host, port });
        }
        Ok(Self { allow })
    }

    /// Whether `host:port` may be dialled.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let h = unbracketed(host);
        let ip = h.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
        // The VM's loopback, however it is written, is always allowed.
        if names_localhost(h) || ip.is_some_and(|ip| ip.is_loopback()) {
            return true;
        }
        let h = h.to_ascii_lowercase();
        self.allow.iter().any(|a| {
            a.port.is_none_or(|p| p == port)
                && match &a.host {
                    HostPattern::Any => true,
                    HostPattern::Suffix(s) => h.ends_with(s.as_str()),
                    HostPattern::Exact(e) => *e == h,
                    HostPattern::Ip(allowed) => ip == Some(*allowed),
                }
        })
    }

    /// Dials a target for a client, within `timeout`.
    pub async fn dial(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, DialRefusal> {
        let shown = Shown(host, port).to_string();
        if !self.allows(host, port) {
            return Err(DialRefusal::NotAllowed(shown));
        }
        // The name lookup counts against the deadline: a resolver that hangs must not hold
        // the client's stream longer than a silent target would.
        let deadline = tokio::time::Instant::now() + timeout;
        let h = unbracketed(host);
        let addrs: Vec<SocketAddr> = if names_localhost(h) {
            // ::1 first: a VM service reachable through the edge binds ::, and an IPv4-only
            // one still answers on 127.0.0.1.
            vec![
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            ]
        } else {
            tokio::time::timeout_at(deadline, tokio::net::lookup_host((h, port)))
                .await
                .map_err(|_| DialRefusal::Timeout(format!("{shown} (resolving its name)")))?
                .map_err(|e| DialRefusal::Unreachable(shown.clone(), e))?
                .collect()
        };
        // ::1 first on every dial, as documented. (Session 29 put the address that answered
        // last first, so a hanging ::1 cost the race's 250 ms once; but one slow moment of a
        // ::1 service, a full accept queue in a burst, then sent every later connection to
        // whatever listens on 127.0.0.1 at that port, for good: a tester's finding.)
        // Raced, not tried in turn: a ::1 that never answers (a full accept queue, a firewall
        // that drops) would hold 127.0.0.1 back for the whole dial timeout.
        let attempt =
            |addr: SocketAddr| async move { TcpStream::connect(addr).await.map(|s| (s, addr)) };
        let failed = match tokio::time::timeout_at(deadline, race(&addrs, attempt, |_| false)).await
        {
            Err(_) => return Err(DialRefusal::Timeout(shown)),
            Ok(Ok((s, addr))) => {
                if let Err(e) = tune_tcp(&s) {
                    tracing::debug!(error = %e, "could not tune target socket");
                }
                // A killed agent resets the service's connection instead of ending it.
                crate::relay::arm_reset_on_exit(&s);
                // When ::1 refused or was slow, 127.0.0.1 may be another program on the same
                // port: name what answered, for whoever wonders why the service is odd.
                if addrs.first() != Some(&addr) {
                    tracing::debug!(target = %shown, %addr, "dialled another address than the first");
                }
                return Ok(s);
            }
            Ok(Err(failed)) => failed,
        };
        // A refusal is a definite "nothing listens on that port", where another address's
        // failure (::1 in a VM without IPv6) says less; and in a race, which failed last is
        // down to timing.
        if failed
            .iter()
            .any(|(_, e)| e.kind() == io::ErrorKind::ConnectionRefused)
        {
            return Err(DialRefusal::Refused(shown));
        }
        let cause = failed
            .into_iter()
            .last()
            .map(|(_, e)| e)
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"));
        Err(DialRefusal::Unreachable(shown, cause))
    }
}

/// How long an agent tries to reach a target unless told otherwise (`--dial-timeout`).
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Logs a refused stream on the agent: one line per [`crate::throttle::LOG_EVERY`] at info,
/// with how many were left out, the rest at debug. A client's pool retrying a port with
/// nothing behind it wrote one line per attempt (100 for 100, a tester's finding); the client
/// itself already logs such failures throttled.
pub(crate) fn log_refusal(refusal: &DialRefusal) {
    static REFUSALS: crate::throttle::Throttle = crate::throttle::Throttle::new();
    match REFUSALS.pass() {
        Some(more) => tracing::info!(not_logged = more, "refusing stream: {refusal}"),
        None => tracing::debug!("refusing stream: {refusal}"),
    }
}

/// A target as the logs and the `forwarding` lines show it: `localhost:PORT` for the VM's own
/// loopback (an empty host), IPv6 literals in brackets. A host with control characters (an
/// `OPEN` frame's host is any UTF-8 a client sends) is shown escaped: raw, a newline in it
/// forged whole log lines on the agent (a tester's finding).
pub(crate) struct Shown<'a>(pub(crate) &'a str, pub(crate) u16);

/// Characters a peer's text must not bring into a log or a terminal as they are: control
/// characters (a line feed forges a log line, an escape sequence drives the terminal) and the
/// invisible ones that reorder or hide text (bidirectional overrides and isolates, zero-width
/// characters: `vm1\u{202e}gol.txt` shows as `vm1txt.log`).
pub fn is_deceptive(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}'
        )
}

/// Text from a peer, for a log line: quoted and escaped when it holds [`is_deceptive`]
/// characters, as it is otherwise.
pub(crate) struct Escaped<'a>(pub(crate) &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.chars().any(is_deceptive) {
            write!(f, "\"{}\"", self.0.escape_debug())
        } else {
            f.write_str(self.0)
        }
    }
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.chars().any(is_deceptive) {
            return write!(f, "{}:{}", Escaped(self.0), self.1);
        }
        match self.0 {
            "" => write!(f, "localhost:{}", self.1),
            h if h.contains(':') && !h.starts_with('[') => write!(f, "[{h}]:{}", self.1),
            h => write!(f, "{h}:{}", self.1),
        }
    }
}

/// Why the agent did not connect a stream to its target, whichever the carrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    NotAllowed,
    Refused,
    Timeout,
    Unreachable,
}

impl Refusal {
    /// The client's words for it, the same over every transport; `target` as [`Shown`].
    pub(crate) fn message(self, target: &str) -> String {
        match self {
            Refusal::NotAllowed => format!(
                "agent refused {target}: not allowed by its policy (only the VM's loopback unless the agent runs with --allow)"
            ),
            Refusal::Refused => format!(
                "agent could not connect to {target}: connection refused (is the service running on the VM?)"
            ),
            Refusal::Timeout => format!(
                "agent timed out connecting to {target}: it did not answer within the agent's dial timeout (its --dial-timeout)"
            ),
            Refusal::Unreachable => format!(
                "agent cannot reach {target}: unreachable or not resolvable from the VM"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's text that would reorder or hide what a log shows (tester I's `Host:` header
    /// `vm1\u{202e}gol.txt\tX`) is quoted and escaped; a plain name is shown as it is.
    #[test]
    fn deceptive_characters_are_escaped_in_logged_text() {
        let shown = Escaped("vm1\u{202e}gol.txt\tX").to_string();
        assert_eq!(shown, r#""vm1\u{202e}gol.txt\tX""#);
        assert_eq!(Escaped("vm1.vm.vers.sh").to_string(), "vm1.vm.vers.sh");
        assert_eq!(Shown("a\u{200b}b", 80).to_string(), r#""a\u{200b}b":80"#);
        // Letters of any script are not deceptive.
        assert!(!"bücher.example".chars().any(is_deceptive));
    }

    /// A client's `OPEN` host reaches the agent's log escaped: one line, whatever it holds.
    #[tokio::test]
    async fn a_refused_host_with_control_characters_is_logged_on_one_line() {
        let host =
            "x\n2026-12-02T11:59:59Z  INFO forward_tunnel::agent: carrier authenticated\u{0}";
        let refusal = TargetPolicy::default()
            .dial(host, 80, Duration::from_secs(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(!refusal.chars().any(char::is_control), "{refusal:?}");
        assert!(
            refusal.contains("target \"x\\n2026-12-02T11:59:59Z  INFO"),
            "{refusal:?}"
        );
        assert_eq!(Shown("db.internal", 5432).to_string(), "db.internal:5432");
        assert_eq!(Shown("::1", 22).to_string(), "[::1]:22");
    }

    #[test]
    fn loopback_only_by_default() {
        let p = TargetPolicy::default();
        for h in ["", "localhost", "127.0.0.1", "::1", "[::1]", "127.0.0.2"] {
            assert!(p.allows(h, 5432), "{h}");
        }
        for h in ["10.0.0.5", "db.internal", "example.com", "::ffff:10.0.0.1"] {
            assert!(!p.allows(h, 5432), "{h}");
        }
    }

    #[test]
    fn patterns_widen() {
        let p = TargetPolicy::new(&["db.internal:5432", "*.svc:*", "10.0.0.5:*"]).unwrap();
        assert!(p.allows("db.internal", 5432));
        assert!(!p.allows("db.internal", 5433));
        assert!(p.allows("a.b.svc", 1));
        assert!(!p.allows("svc", 1));
        assert!(p.allows("10.0.0.5", 22));
        assert!(!p.allows("10.0.0.6", 22));
        assert!(TargetPolicy::new(&["*:*"]).unwrap().allows("x", 1));
    }

    /// Addresses are compared as addresses, however they are written.
    #[test]
    fn ip_patterns_match_every_spelling_of_the_address() {
        let p = TargetPolicy::new(&["[fd00::9]:7", "[2001:DB8::1]:22", "10.0.0.5:*"]).unwrap();
        for (h, port) in [
            ("[fd00::9]", 7),
            ("fd00:0::9", 7),
            ("[fd00:0:0:0:0:0:0:9]", 7),
            ("2001:0db8::1", 22),
            ("[2001:db8::1]", 22),
            ("::ffff:10.0.0.5", 80),
        ] {
            assert!(p.allows(h, port), "{h}:{port}");
        }
        assert!(!p.allows("fd00::9", 8));
        assert!(!p.allows("fd00::10", 7));
        // A v4-mapped loopback is loopback.
        assert!(TargetPolicy::default().allows("::ffff:127.0.0.1", 1));
    }

    #[test]
    fn bad_patterns() {
        for bad in [
            "db",
            ":80",
            "db:0",
            "db:x",
            "a*b:1",
            "10.0.0.0/8:5432",
            "a b:5432",
            "http://x:5432",
            "*.:443",
            "db..internal:1",
            // An address and a port, or one address? Brackets say.
            "2001:db8::1:22",
            "fd00::9:*",
        ] {
            let e = TargetPolicy::new(&[bad]).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("HOST:PORT"), "{e}");
        }
    }

    /// Each mistake is named, not only the expected form.
    #[test]
    fn bad_patterns_say_what_is_wrong() {
        for (bad, why) in [
            ("db", "no port (':*' allows every port)"),
            (":80", "the host is empty"),
            ("db:0", "port '0' is not 1-65535"),
            ("db:+22", "port '+22' is not 1-65535"),
            ("db:x", "port 'x'"),
            ("a*b:1", "'*' stands only alone or as the first label"),
            ("10.0.0.0/8:5432", "looks like a range"),
            ("http://x:5432", "is a URL"),
            ("db.internal.:5432", "ends with a dot"),
            ("a b:5432", "'a b' is not a host name or IP address"),
            ("2001:db8::1:22", "an IPv6 address goes in brackets"),
        ] {
            let e = TargetPolicy::new(&[bad]).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[tokio::test]
    async fn refused_and_not_allowed_are_told_apart() {
        let p = TargetPolicy::default();
        // Bound, never listening: refused, and no other test's listener can take the port.
        let closed =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        closed
            .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let port = closed.local_addr().unwrap().as_socket().unwrap().port();
        let e = p.dial("127.0.0.1", port, Duration::from_secs(5)).await;
        assert!(matches!(e, Err(DialRefusal::Refused(_))), "{e:?}");
        let e = p.dial("10.1.2.3", 80, Duration::from_secs(5)).await;
        assert!(matches!(e, Err(DialRefusal::NotAllowed(_))), "{e:?}");
    }

    /// The tester's case: `::1` silent, `127.0.0.1` answering at once. Tried one after the other,
    /// the client's stream was reset at the end of the dial timeout, 127.0.0.1 never tried.
    #[tokio::test]
    async fn a_silent_ipv6_loopback_does_not_hold_up_the_ipv4_one() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // One port free on both loopbacks: ::1 silent there, 127.0.0.1 listening.
        let (live, _silent) = loop {
            let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = live.local_addr().unwrap().port();
            let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
            match crate::dial::silent_listener(v6).await {
                Ok(silent) => break (live, silent),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => panic!("binding {v6}: {e}"),
            }
        };
        let port = live.local_addr().unwrap().port();
        for host in ["localhost", ""] {
            let started = std::time::Instant::now();
            let mut s = TargetPolicy::default()
                .dial(host, port, Duration::from_secs(30))
                .await
                .unwrap();
            // Generous for a loaded box; the point is not waiting out the 30 s.
            let took = started.elapsed();
            assert!(took < Duration::from_secs(10), "{host:?}: took {took:?}");
            let (mut accepted, _) = live.accept().await.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            accepted.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            accepted.write_all(b"pong").await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"pong");
        }
        // Once ::1 answers again, it is ::1 that is reached: 127.0.0.1 having answered
        // before must not send every later connection there (a tester's finding).
        drop(_silent);
        let v6 = tokio::net::TcpListener::bind((Ipv6Addr::LOCALHOST, port))
            .await
            .unwrap();
        let _s = TargetPolicy::default()
            .dial("localhost", port, Duration::from_secs(30))
            .await
            .unwrap();
        let accepted = tokio::time::timeout(Duration::from_secs(10), v6.accept()).await;
        assert!(accepted.is_ok(), "the dial went to 127.0.0.1, not ::1");
    }
}
