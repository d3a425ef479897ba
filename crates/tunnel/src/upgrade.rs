//! The HTTP/1.1 opening of a mux carrier, so the agent port also answers `GET /health` like any
//! Vers service and passes through HTTP-aware proxies.
//!
//! ```text
//! client: GET /v1/tunnel HTTP/1.1 | Host: vm.vm.vers.sh:9999 | Connection: Upgrade | Upgrade: forward-mux/1
//! agent:  HTTP/1.1 101 Switching Protocols | Upgrade: forward-mux/1 | Forward-Challenge: <64 hex>
//! then mux frames both ways, the client's first frame being AUTH.
//! ```

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::auth::PROTOCOL;

/// Longest request or response head we accept; real ones are ~200 bytes.
pub const MAX_HEAD: usize = 8 * 1024;
/// Path of the upgrade.
pub const TUNNEL_PATH: &str = "/v1/tunnel";
/// Header carrying the challenge.
pub const CHALLENGE_HEADER: &str = "forward-challenge";
/// The agent's name for the carrier, in its `101`: a client that later loses the carrier
/// names it again when it reconnects ([`REPLACES_HEADER`]).
pub const CARRIER_HEADER: &str = "forward-carrier";
/// In a client's upgrade request: the carrier it lost and replaces. Once the new carrier
/// authenticates, the agent closes the old one, and with it the VM-side connections of its
/// streams (the client reset them when it gave the carrier up).
pub const REPLACES_HEADER: &str = "forward-replaces";
/// Length of a carrier name: 16 random bytes as hex.
pub const CARRIER_ID_LEN: usize = 32;

/// Whether `v` has the form of a carrier name.
pub fn is_carrier_id(v: &str) -> bool {
    v.len() == CARRIER_ID_LEN && v.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What [`read_head`] fails with when the first byte cannot start an HTTP head: the byte.
#[derive(Debug)]
struct NotHttp(u8);

impl std::fmt::Display for NotHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tls = match self.0 {
            0x16 => ": a TLS handshake",
            0x15 => ": a TLS alert, so that side expects TLS",
            _ => "",
        };
        write!(f, "not HTTP (first byte 0x{:02x}{tls})", self.0)
    }
}

impl std::error::Error for NotHttp {}

/// Whether [`read_head`] failed on a TLS alert: the other side speaks TLS (an edge, or an
/// agent with its own certificate) and refused our plain HTTP.
pub fn answered_with_tls_alert(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<NotHttp>())
        .is_some_and(|n| n.0 == 0x15)
}

/// Reads up to the blank line ending an HTTP head. Returns the head and whatever followed it.
pub async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(String, Vec<u8>)> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        // A TLS ClientHello (a client that expected the agent's own TLS) or other non-HTTP bytes
        // get their answer now, not at the auth deadline.
        if let Some(&b) = buf.first().filter(|b| !b.is_ascii_uppercase()) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, NotHttp(b)));
        }
        if let Some(end) = head_end(&buf) {
            if end > MAX_HEAD {
                return Err(too_long());
            }
            let rest = buf.split_off(end);
            let head = String::from_utf8(buf).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, "HTTP head is not UTF-8")
            })?;
            return Ok((head, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(too_long());
        }
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the HTTP head ended",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The length of the head up to and including its blank line. Lines may end in a bare LF
/// (RFC 9112 §2.2: `printf 'GET /health HTTP/1.1\n\n' | nc` waited for the auth deadline).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.iter().enumerate().find_map(|(i, &b)| {
        (b == b'\n')
            .then(|| match &buf[i + 1..] {
                [b'\n', ..] => Some(i + 2),
                [b'\r', b'\n', ..] => Some(i + 3),
                _ => None,
            })
            .flatten()
    })
}

fn too_long() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "HTTP head longer than 8 KiB")
}

/// A parsed head: first line split in three, headers with lower-case names.
#[derive(Debug)]
pub struct Head {
    /// Method (request) or version (response).
    pub first: String,
    /// Path (request) or status code (response).
    pub second: String,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// Parses a head read by [`read_head`]; `None` if it is not HTTP.
    pub fn parse(text: &str) -> Option<Head> {
        // No control characters but tab (RFC 9110 field values) in a line: an escape sequence
        // or a CR in a header we log would let a stranger forge log lines. A line ends in LF,
        // with or without CR before it (RFC 9112 §2.2), so no value holds either.
        let lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
        if lines
            .clone()
            .any(|l| l.chars().any(|c| c.is_control() && c != '\t'))
        {
            return None;
        }
        let mut lines = lines;
        let mut first = lines.next()?.splitn(3, ' ');
        let a = first.next()?.to_owned();
        let b = first.next()?.to_owned();
        let mut headers = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once(':')?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        Some(Head {
            first: a,
            second: b,
            headers,
        })
    }

    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The one `Host` header, split into name and port (0 when it has none): `None` when there
    /// is no `Host`, more than one, or one that is malformed (empty name, unbalanced bracket).
    /// The proof covers it, so anything looser would only be answered with a challenge that
    /// cannot succeed.
    pub fn single_host(&self) -> Option<(String, u16)> {
        let mut hosts = self.headers.iter().filter(|(k, _)| k == "host");
        let (_, v) = hosts.next()?;
        if hosts.next().is_some() {
            return None;
        }
        let v = v.trim();
        let balanced = v.starts_with('[') == v.contains(']');
        let (host, port) = split_host(v);
        (balanced && !host.is_empty() && !host.contains(['[', ']'])).then_some((host, port))
    }

    /// Whether this asks to upgrade to our protocol.
    pub fn is_upgrade(&self) -> bool {
        self.header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case(PROTOCOL))
    }
}

/// The client's request.
pub fn request(host: &str, port: u16) -> String {
    request_replacing(host, port, None)
}

/// The client's request, naming the carrier it lost, if any (see [`REPLACES_HEADER`]).
pub fn request_replacing(host: &str, port: u16, replaces: Option<&str>) -> String {
    // An IPv6 literal goes in brackets, or the agent would read its last group as the port and
    // check the proof against the wrong host.
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let replaces = replaces
        .filter(|id| is_carrier_id(id))
        .map(|id| format!("Forward-Replaces: {id}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {TUNNEL_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: Upgrade\r\nUpgrade: {PROTOCOL}\r\n{replaces}User-Agent: forward/{}\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// The agent's 101 with the challenge and the carrier's name.
pub fn switching(challenge_hex: &str, carrier_id: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {PROTOCOL}\r\nForward-Challenge: {challenge_hex}\r\nForward-Carrier: {carrier_id}\r\n\r\n"
    )
}

/// The body of the agent's `503` to a connection it evicted before the upgrade (too many
/// unauthenticated connections): the client retries on it.
pub const BUSY_BODY: &str = "forward agent: too many unauthenticated connections, retry\n";

/// A short complete response.
pub fn simple(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Splits a `Host` header into host and port (port 0 if absent).
pub fn split_host(v: &str) -> (String, u16) {
    if let Some(rest) = v.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once("]:") {
            return (h.to_owned(), p.parse().unwrap_or(0));
        }
        return (rest.trim_end_matches(']').to_owned(), 0);
    }
    match v.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_owned(), p.parse().unwrap_or(0)),
        _ => (v.to_owned(), 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_needs_exactly_one_well_formed_host() {
        let head = |hosts: &str| {
            Head::parse(&format!(
                "GET {TUNNEL_PATH} HTTP/1.1\r\n{hosts}Upgrade: {PROTOCOL}"
            ))
            .unwrap()
        };
        assert_eq!(
            head("Host: vm1.vm.vers.sh:9999\r\n").single_host(),
            Some(("vm1.vm.vers.sh".into(), 9999))
        );
        assert_eq!(
            head("Host: [::1]:9999\r\n").single_host(),
            Some(("::1".into(), 9999))
        );
        assert_eq!(head("Host: vm1\r\n").single_host(), Some(("vm1".into(), 0)));
        for bad in [
            "",
            "Host: \r\n",
            "Host: [::1:9999\r\n",
            "Host: a:1\r\nHost: b:2\r\n",
        ] {
            assert_eq!(head(bad).single_host(), None, "{bad:?}");
        }
    }

    #[test]
    fn parses_request_and_host() {
        let r = request("vm1.vm.vers.sh", 9999);
        let h = Head::parse(r.trim_end()).unwrap();
        assert_eq!((h.first.as_str(), h.second.as_str()), ("GET", TUNNEL_PATH));
        assert!(h.is_upgrade());
        assert_eq!(
            split_host(h.header("host").unwrap()),
            ("vm1.vm.vers.sh".into(), 9999)
        );
        assert_eq!(split_host("[::1]:80"), ("::1".into(), 80));
        let v6 = Head::parse(request("fd00::5", 9999).trim_end()).unwrap();
        assert_eq!(
            split_host(v6.header("host").unwrap()),
            ("fd00::5".into(), 9999)
        );
        assert_eq!(split_host("::1"), ("::1".into(), 0));
        assert!(Head::parse("garbage").is_none());
    }

    #[tokio::test]
    async fn head_keeps_what_follows() {
        let data = b"HTTP/1.1 101 X\r\nA: b\r\n\r\n\x01\x02".to_vec();
        let (head, rest) = read_head(&mut data.as_slice()).await.unwrap();
        assert_eq!(rest, vec![1, 2]);
        assert_eq!(Head::parse(&head).unwrap().second, "101");
        let long = vec![b'A'; MAX_HEAD + 2000];
        assert!(read_head(&mut long.as_slice()).await.is_err());
        // The limit holds for a head that ends inside the last read, too.
        let mut ends_late = b"GET / HTTP/1.1\r\nX: ".to_vec();
        ends_late.resize(MAX_HEAD + 500, b'a');
        ends_late.extend_from_slice(b"\r\n\r\n");
        let e = read_head(&mut ends_late.as_slice()).await.unwrap_err();
        assert!(e.to_string().contains("8 KiB"), "{e}");
        let at_limit = {
            let mut h = b"GET / HTTP/1.1\r\nX: ".to_vec();
            h.resize(MAX_HEAD - 4, b'a');
            h.extend_from_slice(b"\r\n\r\n");
            h
        };
        assert!(read_head(&mut at_limit.as_slice()).await.is_ok());
    }

    #[tokio::test]
    async fn a_head_with_bare_line_feeds_ends_at_its_blank_line() {
        for (data, head) in [
            (
                &b"GET /health HTTP/1.1\n\nrest"[..],
                "GET /health HTTP/1.1\n\n",
            ),
            (
                b"GET /health HTTP/1.1\nHost: a\n\r\nrest",
                "GET /health HTTP/1.1\nHost: a\n\r\n",
            ),
            (
                b"GET /health HTTP/1.1\r\nHost: a\r\n\nrest",
                "GET /health HTTP/1.1\r\nHost: a\r\n\n",
            ),
        ] {
            let (got, rest) = read_head(&mut &data[..]).await.unwrap();
            assert_eq!((got.as_str(), rest.as_slice()), (head, &b"rest"[..]));
            let h = Head::parse(&got).unwrap();
            assert_eq!((h.first.as_str(), h.second.as_str()), ("GET", "/health"));
        }
        let h = Head::parse("GET /x HTTP/1.1\nHost: a:1\nUpgrade: forward-mux/1\n\n").unwrap();
        assert_eq!(h.single_host(), Some(("a".into(), 1)));
    }

    #[tokio::test]
    async fn non_http_bytes_are_refused_at_once() {
        // The start of a TLS ClientHello: no CRLFCRLF would ever come.
        let hello = [0x16u8, 0x03, 0x01, 0x02, 0x00];
        let e = read_head(&mut hello.as_slice()).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("not HTTP (first byte 0x16: a TLS handshake)"),
            "{e}"
        );
    }

    #[test]
    fn control_characters_in_a_head_are_refused() {
        // A bare LF ends a line: the text after it is no part of the value logged.
        let split =
            Head::parse("GET /x HTTP/1.1\r\nHost: evil\nX: 2026-01-01 INFO forged\r\n").unwrap();
        assert_eq!(split.header("host"), Some("evil"));
        assert!(Head::parse("GET /x HTTP/1.1\r\nHost: a\x1b[31mb\r\n").is_none());
        assert!(Head::parse("GET /x HTTP/1.1\r\nHost: a\rb\r\n").is_none());
        assert!(Head::parse("GET /x HTTP/1.1\r\nX-A:\tb\r\n").is_some());
    }
}
