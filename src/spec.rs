//! Forward specs in the form of `ssh -L`: `[bind:]lport:host:rport`.
//!
//! Parsed right to left, because the left part may hold colons (`[::1]:5432:...`) or a Unix
//! socket path, while the right part never does except inside brackets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

/// Where the local side listens, before ports are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalSide {
    /// TCP on each of these addresses (default: both loopbacks) and this port (0 = pick one).
    Tcp {
        /// Addresses to bind, each with the same port.
        addrs: Vec<IpAddr>,
        /// Local port, 0 asks for a free one.
        port: u16,
    },
    /// A Unix stream socket.
    Unix(PathBuf),
}

/// One parsed forward spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The text as given, for messages.
    pub text: String,
    /// Where to listen.
    pub local: LocalSide,
    /// The VM id or host name as written.
    pub host: String,
    /// In agent mode: a host to dial from the VM instead of its loopback (`vm/target`).
    pub via_target: Option<String>,
    /// Remote port.
    pub rport: u16,
}

/// What is wrong with a spec; the Display names the part and the expected form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid forward spec '{spec}': {problem}")]
pub struct SpecError {
    spec: String,
    problem: String,
}

const FORM: &str = "expected [bind:]lport:host:rport, e.g. 5432:myvm:5432 or [::1]:8080:myvm:80";

fn err(spec: &str, problem: impl Into<String>) -> SpecError {
    SpecError {
        spec: spec.to_owned(),
        problem: problem.into(),
    }
}

/// A port number written in digits only: `u16::from_str` also takes a sign ("+22").
pub fn port_number(s: &str) -> Option<u16> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    s.parse().ok().filter(|_| digits)
}

/// The `ssh -L 8080:localhost:80` habit, as `localhost` or a loopback address, where the VM
/// goes: `localhost` became `localhost.vm.vers.sh`, and `127.0.0.1` dialled this machine over
/// TLS.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.trim_end_matches('.').eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// " (drop the trailing dot)" for a host that is valid without its trailing dot, else "".
pub fn trailing_dot_hint(host: &str) -> &'static str {
    if host.ends_with('.') && valid_host(host.trim_end_matches('.')) {
        " (drop the trailing dot)"
    } else {
        ""
    }
}

/// Parses a port field; `allow_zero` for the local side only.
fn port(spec: &str, what: &str, s: &str, allow_zero: bool) -> Result<u16, SpecError> {
    let range = if allow_zero { "0-65535" } else { "1-65535" };
    let p = port_number(s).ok_or_else(|| {
        err(
            spec,
            format!("{what} '{s}' is not a port number ({range}); {FORM}"),
        )
    })?;
    if p == 0 && !allow_zero {
        return Err(err(spec, format!("{what} must be 1-65535, not 0")));
    }
    Ok(p)
}

/// Splits `s` at its last top-level colon (colons inside `[...]` do not count).
fn rsplit_colon(s: &str) -> Option<(&str, &str)> {
    let mut depth = 0i32;
    for (i, c) in s.char_indices().rev() {
        match c {
            ']' => depth += 1,
            '[' => depth -= 1,
            ':' if depth == 0 => return Some((&s[..i], &s[i + 1..])),
            _ => {}
        }
    }
    None
}

pub fn valid_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().is_ok();
    }
    forward_tunnel::policy::is_name(h)
}

fn parse_bind(spec: &str, b: &str) -> Result<Vec<IpAddr>, SpecError> {
    match b {
        // `ssh -L` reads an empty bind address as "all interfaces"; quietly meaning loopback
        // instead would surprise one half of the users and the other way round the other half.
        "" => Err(err(
            spec,
            "bind address before the local port is empty: write localhost (loopback), '*' (all interfaces) or an IP, or leave out the colon",
        )),
        _ if b.eq_ignore_ascii_case("localhost") => Ok(loopbacks()),
        "*" => Ok(vec![
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ]),
        _ if !b.is_empty() && b.bytes().all(|c| c.is_ascii_digit()) => Err(err(
            spec,
            format!("'{b}' stands where the bind address goes but looks like a port: one field too many? {FORM}"),
        )),
        _ if b.contains('%') => Err(err(
            spec,
            format!("bind address '{b}' has a zone ('%...'), which is not supported; bind a global address, or '*'"),
        )),
        _ => {
            let inner = b
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .unwrap_or(b);
            if let Ok(v6) = inner.parse::<Ipv6Addr>() {
                // The kernel refuses these on the v6-only sockets we listen on (EINVAL).
                if let Some(v4) = v6.to_ipv4_mapped() {
                    return Err(err(
                        spec,
                        format!("bind address '{b}' is an IPv4 address in IPv6 form, which cannot be bound; write {v4}"),
                    ));
                }
            }
            inner.parse::<IpAddr>().map(|a| vec![a]).map_err(|_| {
                err(
                    spec,
                    format!(
                        "bind address '{b}' is not an IP address, 'localhost' or '*' (IPv6 goes in brackets: [::1])"
                    ),
                )
            })
        }
    }
}

/// The DNS (and TLS) name of a host as typed: a VM id gets the domain appended, a name with a
/// dot (or an IP literal) is used as given.
pub fn host_name(host: &str, domain: &str) -> String {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if h.contains('.') || h.contains(':') {
        h.to_owned()
    } else {
        format!("{h}.{domain}")
    }
}

/// Both loopback addresses: the safe default, as with `ssh -L`.
pub fn loopbacks() -> Vec<IpAddr> {
    vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ]
}

impl Spec {
    /// Parses one spec.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(err(text, format!("empty; {FORM}")));
        }
        if !t.contains(':') && t.bytes().all(|b| b.is_ascii_lowercase()) {
            // A mistyped command (`forward agnet`) lands here as a spec.
            return Err(err(
                text,
                format!("{FORM}, or a command: stdio, agent, demo (see --help)"),
            ));
        }
        // Only where no path can be: a socket path may hold any bracket.
        if !t.contains('/') && t.matches('[').count() != t.matches(']').count() {
            return Err(err(
                text,
                format!("a '[' without its ']' or the other way round: an IPv6 address goes whole in brackets; {FORM}"),
            ));
        }
        // More colons than the four fields have: an unbracketed IPv6 address.
        if t.contains("::") && t.matches(':').count() > 3 && !t.contains('[') && !t.contains('/') {
            // `22010:::1:20001` splits into a bind address `22010:` and host `1`, which named
            // the wrong part.
            return Err(err(
                text,
                format!("an IPv6 address goes whole in brackets, e.g. [::1]:8080:myvm:80; {FORM}"),
            ));
        }
        let (rest, rport) = rsplit_colon(t).ok_or_else(|| err(text, FORM))?;
        let (local_text, host_field) = rsplit_colon(rest).ok_or_else(|| err(text, FORM))?;
        if local_text.is_empty() {
            return Err(err(text, format!("local port is missing; {FORM}")));
        }
        // `5433:abc/[::1]` names a VM and a target but no port; `1:abc/[::1]:22/x` has a port
        // with something after it.
        if rport.split_once('/').is_some_and(|(vm, target)| {
            !vm.bytes().all(|b| b.is_ascii_digit()) && valid_host(target)
        }) {
            // `5433:abc/[::1]`: the last field is the target itself.
            return Err(err(
                text,
                format!("remote port is missing after the target '{rport}'; {FORM}"),
            ));
        }
        let rport = port(text, "remote port", rport, false)?;
        let (host, via_target) = match host_field.split_once('/') {
            Some((vm, target)) => (vm, Some(target)),
            None => (host_field, None),
        };
        if host.is_empty() {
            return Err(err(text, format!("host is empty; {FORM}")));
        }
        if is_loopback_host(host) {
            return Err(err(
                text,
                format!("host '{host}' stands where the VM goes: name the VM (8080:<vm>:80 reaches port 80 on the VM itself)"),
            ));
        }
        if !valid_host(host) {
            let hint = trailing_dot_hint(host);
            return Err(err(
                text,
                format!("host '{host}' is not a valid VM id or host name{hint}"),
            ));
        }
        if let Some(target) = via_target {
            if !valid_host(target) {
                return Err(err(
                    text,
                    format!("target '{target}' after '/' is not a valid host name or IP address"),
                ));
            }
        }
        let local = if local_text.contains('/') {
            // `[bind:]5433:abc/::1:5432` splits as a socket path `[bind:]5433:abc/:` and host
            // `1`: an unbracketed IPv6 target, not a path whose first part ends in
            // `port:name`.
            let head = local_text.split('/').next().unwrap_or_default();
            if let Some((before, _vm)) = rsplit_colon(head) {
                let lport = rsplit_colon(before).map_or(before, |(_, p)| p);
                if !lport.is_empty() && lport.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err(
                        text,
                        "an IPv6 target after '/' goes in brackets, e.g. 5433:abc/[fd00::5]:5432",
                    ));
                }
            }
            if let Some((bind, _)) = local_text.split_once(":/") {
                return Err(err(
                    text,
                    format!("a Unix socket path takes no bind address: drop '{bind}:'"),
                ));
            }
            // A directory is not a socket name: `/tmp/pg/:vm:5432` was told its parent "takes
            // no socket file", or to remove the directory (a tester's finding).
            if local_text.ends_with('/') {
                return Err(err(
                    text,
                    format!("socket path '{local_text}' ends in '/': name the socket file, e.g. {local_text}forward.sock"),
                ));
            }
            LocalSide::Unix(PathBuf::from(local_text))
        } else {
            match rsplit_colon(local_text) {
                Some((bind, lport)) => LocalSide::Tcp {
                    addrs: parse_bind(text, bind)?,
                    port: port(text, "local port", lport, true)?,
                },
                None if local_text.starts_with('[') => {
                    return Err(err(
                        text,
                        format!("'{local_text}' needs a ':' between the ']' and the local port, e.g. [::1]:8080:myvm:80"),
                    ));
                }
                None if local_text
                    .bytes()
                    .any(|b| b.is_ascii_alphabetic() || b == b'.') =>
                {
                    return Err(err(
                        text,
                        format!("local port '{local_text}' is not a port number (0-65535); a Unix socket path needs a '/', e.g. ./{local_text}"),
                    ));
                }
                None => LocalSide::Tcp {
                    addrs: loopbacks(),
                    port: port(text, "local port", local_text, true)?,
                },
            }
        };
        Ok(Spec {
            text: text.to_owned(),
            local,
            host: host.to_owned(),
            via_target: via_target.map(str::to_owned),
            rport,
        })
    }
}

/// Whether two socket paths name the same file: compared absolute and with `.` and `..`
/// resolved through the directories that exist (the socket files themselves do not yet).
fn same_file(x: &std::path::Path, y: &std::path::Path) -> bool {
    let resolve = |p: &std::path::Path| {
        let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
        match (abs.parent().map(std::fs::canonicalize), abs.file_name()) {
            (Some(Ok(dir)), Some(name)) => dir.join(name),
            _ => abs,
        }
    };
    x == y || resolve(x) == resolve(y)
}

/// The first two SPECs that would listen on the same local address, as "what they share":
/// binding would fail on the second with "already in use", which blames some other program.
pub fn first_clash(specs: &[Spec]) -> Option<(&Spec, &Spec, String)> {
    for (i, a) in specs.iter().enumerate() {
        for b in &specs[i + 1..] {
            let shared = match (&a.local, &b.local) {
                // The same file spelled two ways (`./s`, `/abs/s`, `dir/../s`) too: binding the
                // second was blamed on "what is listening there", this very process.
                (LocalSide::Unix(x), LocalSide::Unix(y)) if same_file(x, y) => {
                    Some(format!("socket {}", x.display()))
                }
                (LocalSide::Tcp { addrs: x, port: p }, LocalSide::Tcp { addrs: y, port: q })
                    if p == q && *p != 0 =>
                {
                    // An unspecified address (0.0.0.0, ::) takes the port on every address of
                    // its family; only of its family, since IPv6 listeners are bound v6-only.
                    let meet = x.iter().any(|u| {
                        y.iter().any(|v| {
                            u == v
                                || (u.is_ipv4() == v.is_ipv4()
                                    && (u.is_unspecified() || v.is_unspecified()))
                        })
                    });
                    meet.then(|| format!("local port {p}"))
                }
                _ => None,
            };
            if let Some(shared) = shared {
                return Some((a, b, shared));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(addrs: Vec<IpAddr>, port: u16) -> LocalSide {
        LocalSide::Tcp { addrs, port }
    }

    #[test]
    fn good_specs() {
        let cases: &[(&str, LocalSide, &str, Option<&str>, u16)] = &[
            ("5432:abc:5432", tcp(loopbacks(), 5432), "abc", None, 5432),
            ("0:abc:80", tcp(loopbacks(), 0), "abc", None, 80),
            (
                "127.0.0.1:8080:abc:80",
                tcp(vec!["127.0.0.1".parse().unwrap()], 8080),
                "abc",
                None,
                80,
            ),
            (
                "[::1]:8080:abc:80",
                tcp(vec!["::1".parse().unwrap()], 8080),
                "abc",
                None,
                80,
            ),
            ("localhost:1:abc:2", tcp(loopbacks(), 1), "abc", None, 2),
            ("LocalHost:1:abc:2", tcp(loopbacks(), 1), "abc", None, 2),
            (
                "*:9000:db.example.com:5432",
                tcp(
                    vec!["0.0.0.0".parse().unwrap(), "::".parse().unwrap()],
                    9000,
                ),
                "db.example.com",
                None,
                5432,
            ),
            (
                "/tmp/pg.sock:abc:5432",
                LocalSide::Unix("/tmp/pg.sock".into()),
                "abc",
                None,
                5432,
            ),
            (
                "5432:abc/10.0.0.5:5432",
                tcp(loopbacks(), 5432),
                "abc",
                Some("10.0.0.5"),
                5432,
            ),
            (
                "5432:abc/[fd00::5]:5432",
                tcp(loopbacks(), 5432),
                "abc",
                Some("[fd00::5]"),
                5432,
            ),
        ];
        for (text, local, host, via, rport) in cases {
            let s = Spec::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(&s.local, local, "{text}");
            assert_eq!(s.host, *host, "{text}");
            assert_eq!(s.via_target.as_deref(), *via, "{text}");
            assert_eq!(s.rport, *rport, "{text}");
        }
    }

    #[test]
    fn bad_specs_name_the_part() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("abc", "expected [bind:]lport:host:rport"),
            ("agnet", "or a command: stdio, agent, demo"),
            ("5432:abc", "expected [bind:]lport:host:rport"),
            ("99999:abc:80", "local port '99999' is not a port number"),
            ("x:abc:80", "local port 'x'"),
            (
                "my.sock:abc:80",
                "a Unix socket path needs a '/', e.g. ./my.sock",
            ),
            ("22010:::1:20001", "an IPv6 address goes whole in brackets"),
            ("::1:80:abc:22", "an IPv6 address goes whole in brackets"),
            (
                "8080:localhost:80",
                "host 'localhost' stands where the VM goes",
            ),
            (
                "5432:127.0.0.1:5432",
                "host '127.0.0.1' stands where the VM goes",
            ),
            ("5432:[::1]:5432", "host '[::1]' stands where the VM goes"),
            ("5432:LOCALHOST.:5432", "host 'LOCALHOST.' stands where"),
            (
                "[::ffff:127.0.0.1]:80:abc:22",
                "is an IPv4 address in IPv6 form, which cannot be bound; write 127.0.0.1",
            ),
            ("80:abc:0", "remote port must be 1-65535"),
            ("80:abc:65536", "remote port '65536'"),
            ("80:abc:", "remote port ''"),
            ("80::22", "host is empty"),
            ("80:a b:22", "host 'a b' is not a valid"),
            ("80:-abc:22", "host '-abc' is not a valid"),
            ("foo:80:abc:22", "bind address 'foo'"),
            ("[::1:80:abc:22", "a '[' without its ']'"),
            ("80:abc:22]", "a '[' without its ']'"),
            (
                "[::1]8080:abc:80",
                "needs a ':' between the ']' and the local port",
            ),
            (
                "[fe80::1%lo]:80:abc:22",
                "has a zone ('%...'), which is not supported",
            ),
            (
                "80:abc.:22",
                "host 'abc.' is not a valid VM id or host name (drop the trailing dot)",
            ),
            (
                "80:a..b:22",
                "host 'a..b' is not a valid VM id or host name",
            ),
            (":abc:22", "local port is missing"),
            ("1:abc/:22", "target '' after '/'"),
            ("0:abc/::1:1", "IPv6 target after '/' goes in brackets"),
            (
                "127.0.0.1:0:vm/::1:22001",
                "IPv6 target after '/' goes in brackets",
            ),
            (
                "localhost:1:vm/::1:2",
                "IPv6 target after '/' goes in brackets",
            ),
            (
                "[::1]:1:vm/fd00::5:2",
                "IPv6 target after '/' goes in brackets",
            ),
            (
                "127.0.0.1:0:vm/[::1]",
                "remote port is missing after the target",
            ),
            (
                "5433:abc/fd00::5:5432",
                "IPv6 target after '/' goes in brackets",
            ),
            ("+42001:abc:22", "local port '+42001' is not a port number"),
            (
                "1:abc/[::1]:22/x",
                "remote port '22/x' is not a port number",
            ),
            ("42001:abc:+22", "remote port '+22'"),
            (
                "42001:abc:22:33",
                "'42001' stands where the bind address goes",
            ),
            (
                ":21000:abc:22",
                "bind address before the local port is empty",
            ),
            (
                "[::1]:/tmp/x.sock:abc:22",
                "a Unix socket path takes no bind address",
            ),
            (
                "/tmp/pg/:abc:5432",
                "socket path '/tmp/pg/' ends in '/': name the socket file, e.g. /tmp/pg/forward.sock",
            ),
            ("./dir/:abc:22", "socket path './dir/' ends in '/'"),
        ];
        for (text, want) in cases {
            let e = Spec::parse(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text:?}: {e:?} should contain {want:?}");
            assert!(e.starts_with("invalid forward spec"), "{e}");
        }
    }

    #[test]
    fn specs_that_would_share_a_local_address_are_found() {
        let parse = |texts: &[&str]| -> Vec<Spec> {
            texts.iter().map(|t| Spec::parse(t).unwrap()).collect()
        };
        let clash = |texts: &[&str]| {
            first_clash(&parse(texts)).map(|(a, b, what)| (a.text.clone(), b.text.clone(), what))
        };
        assert_eq!(
            clash(&["5432:abc:5432", "6000:abc:22", "5432:abc:22"]),
            Some((
                "5432:abc:5432".into(),
                "5432:abc:22".into(),
                "local port 5432".into()
            ))
        );
        assert!(clash(&["0.0.0.0:80:abc:80", "127.0.0.1:80:abc:81"]).is_some());
        assert!(clash(&["/tmp/a.sock:abc:1", "/tmp/a.sock:abc:2"]).is_some());
        // Different addresses, port 0 and different paths are fine.
        assert_eq!(clash(&["127.0.0.1:80:abc:80", "[::1]:80:abc:81"]), None);
        // Each family's wildcard covers only its own family (IPv6 sockets are v6-only).
        assert_eq!(clash(&["0.0.0.0:80:abc:80", "[::1]:80:abc:81"]), None);
        assert_eq!(clash(&["[::]:80:abc:80", "127.0.0.1:80:abc:81"]), None);
        assert!(clash(&["[::]:80:abc:80", "[::1]:80:abc:81"]).is_some());
        assert!(clash(&["*:80:abc:80", "127.0.0.1:80:abc:81"]).is_some());
        assert_eq!(clash(&["0:abc:80", "0:abc:81"]), None);
        assert_eq!(clash(&["/tmp/a.sock:abc:1", "/tmp/b.sock:abc:1"]), None);
        // One file, two spellings.
        let here = std::env::current_dir().unwrap().join("a.sock");
        let abs = format!("{}:abc:2", here.display());
        assert!(clash(&["./a.sock:abc:1", &abs]).is_some());
        assert!(clash(&["/tmp/a.sock:abc:1", "/tmp/../tmp/./a.sock:abc:2"]).is_some());
    }

    #[test]
    fn host_names() {
        assert_eq!(host_name("abc", "vm.vers.sh"), "abc.vm.vers.sh");
        assert_eq!(host_name("db.example.com", "vm.vers.sh"), "db.example.com");
        assert_eq!(host_name("[::1]", "vm.vers.sh"), "::1");
    }
}
