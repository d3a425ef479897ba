//! Agent authentication: the shared token, the challenge and the proof.
//!
//! ```text
//!  agent ── challenge (32 random bytes, fresh per carrier) ──► client
//!  client ── AUTH = HMAC-SHA256(token, "forward-mux/1" ‖ challenge ‖ host ‖ port) ──► agent
//! ```
//!
//! The token never crosses the wire, a captured proof is useless against another challenge,
//! and the agent compares in constant time (`ring::hmac::verify`). Host and port are what the
//! client dialled (sent as the HTTP `Host` header; QUIC: the SNI and the agent's port), so a
//! proof is bound to that name, but the agent can only hold it to its own names if it is told
//! them ([`AgentNames`], `forward agent --name`). Without that, a party a client was tricked
//! into authenticating with could relay the proof to another agent that shares the token.

use std::fmt;
use std::path::Path;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Protocol label mixed into every proof; changes with the protocol version.
pub const PROTOCOL: &str = "forward-mux/1";
/// Length of a challenge.
pub const CHALLENGE_LEN: usize = 32;
/// Environment variable holding the token, as for every Vers service.
pub const TOKEN_ENV: &str = "VERS_AUTH_TOKEN";

/// A shared secret. Its `Debug` never shows the value, so it cannot leak into a log line.
#[derive(Clone)]
pub struct Token(hmac::Key, usize);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<{} bytes, redacted>)", self.1)
    }
}

/// Why no usable token was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Neither source was given.
    #[error("no token: set {TOKEN_ENV} or pass --token-file FILE (generate one with: openssl rand -hex 32)")]
    Missing,
    /// The token file could not be read.
    #[error("cannot read token file {path}: {cause}")]
    Unreadable {
        /// The file.
        path: String,
        /// What the OS said.
        cause: std::io::Error,
    },
    /// Far more than any token: another file given by mistake (or `/dev/zero`, which would
    /// have been read until memory ran out).
    #[error("token file {path} holds more than {MAX_TOKEN_FILE} bytes: is it the right file? It must hold only the token (generate one with: openssl rand -hex 32)")]
    TooLarge {
        /// The file.
        path: String,
    },
    /// Nothing in it.
    #[error("token from {source_name} is empty; put the token in it (generate one with: openssl rand -hex 32)")]
    Empty {
        /// Where it came from.
        source_name: String,
    },
    /// Several lines or control characters inside the token: a file holding something else
    /// too, which would fail authentication with no hint why.
    #[error("token from {source_name} contains {what}; put the token alone on one line (generate one with: openssl rand -hex 32)")]
    Malformed {
        /// Where it came from.
        source_name: String,
        /// What is wrong with it.
        what: &'static str,
    },
    /// A shell line (`export VERS_AUTH_TOKEN=…`) where the token alone belongs: taken as the
    /// token, it failed only later, as a rejected authentication with no hint why.
    #[error("token from {source_name} looks like a shell line ({assignment}...); it must hold only the token itself, without the variable name (e.g. what openssl rand -hex 32 prints)")]
    ShellLine {
        /// Where it came from.
        source_name: String,
        /// The line up to its `=` (the part after it is the secret).
        assignment: String,
    },
    /// `VERS_AUTH_TOKEN=/path/to/token`: the variable holds the token itself, so the path
    /// became the token, and a long path passes the strength estimate (a tester's finding).
    #[error("{TOKEN_ENV} holds the path of a file ({path}), not a token; pass the file with --token-file {path}, or put the token itself in {TOKEN_ENV}")]
    PathInEnv {
        /// The path.
        path: String,
    },
    /// Too short to resist guessing.
    #[error("token from {source_name} is too weak ({bits} bits); use at least 128 bits, e.g. openssl rand -hex 32")]
    TooWeak {
        /// Where it came from.
        source_name: String,
        /// Estimated strength.
        bits: usize,
    },
}

/// A rough strength estimate: hex strings carry 4 bits a character, padded base64 (what
/// `openssl rand -base64` prints) 6 a character before the padding, and anything else what the
/// character classes it uses allow: lower case alone log2(26) ≈ 4.7, lower case and digits
/// log2(36), letters of both cases and digits log2(62), and with anything else as well
/// (symbols, spaces, non-ASCII) log2(95); words (spaces, or lower case alone) 2.6.
/// Counting every token as drawn from the widest alphabet its characters could belong to let
/// `correcthorsebatterystaple` pass for 150 bits; a human-chosen token is drawn from far fewer.
/// A token that repeats itself is as strong as one repetition (`passwordpassword…`), nearly
/// so as one repetition plus its differences, one that mostly counts up or down (`abcd…`) as
/// the characters that break the runs, and one made of a handful of characters (`000…0`) is
/// judged by how many it uses: the agent listens on a public port, so a long but guessable
/// token must not pass for a strong one. A heuristic against mistakes, not a proof of
/// randomness: generate tokens with `openssl rand -hex 32`.
fn estimated_bits(s: &str) -> usize {
    let all: Vec<char> = s.chars().collect();
    let (chars, per_char) = if all.iter().all(|c| c.is_ascii_hexdigit()) {
        (&all[..], 4.0)
    } else if let Some(body) = padded_base64_body(&all) {
        (body, 6.0)
    } else {
        // Trailing `=` that is no base64 padding is still no sign of a wider alphabet.
        let end = all.iter().rposition(|c| *c != '=').map_or(0, |i| i + 1);
        let body = &all[..end];
        // Words (a space between them, or lower-case letters alone, as in
        // `thequickbrownfoxjumpsoverthelazydog`, which passed for 164 bits): at most what words
        // drawn at random from a 7,776-word list carry, 12.9 bits for 5 characters or so.
        // Random tokens of any encoder have digits or capitals.
        let words =
            body.iter().any(|c| c.is_whitespace()) || body.iter().all(char::is_ascii_lowercase);
        (body, if words { PHRASE_BITS } else { class_bits(body) })
    };
    let n = chars.len();
    // A period shows only when it repeats at least once: with any longer "period", a token
    // that merely ends as it starts (1 in 16 random hex tokens) lost bits it has.
    let period = (1..=n / 2)
        .find(|&p| chars.iter().enumerate().all(|(i, c)| *c == chars[i % p]))
        .unwrap_or(n);
    // Nearly periodic (`passwordpasswordpasswordpassword1`): one period plus what differs. Only
    // when three in four characters repeat the one a period back: random text matches about
    // one in its alphabet's size, and a fair 32-digit hex token must keep its 128 bits.
    let near = (1..=n / 2)
        .filter_map(|p| {
            let differ = (p..n).filter(|&i| chars[i] != chars[i - p]).count();
            (differ * 4 <= n - p).then_some(p + differ)
        })
        .min()
        .unwrap_or(n);
    // Mostly runs (`abcdefghijklmnopqrstuvwxyz012345`): a step of one tells nothing new.
    let stepped = (1..n)
        .filter(|&i| {
            (i64::from(u32::from(chars[i])) - i64::from(u32::from(chars[i - 1]))).abs() == 1
        })
        .count();
    let novel = if stepped * 2 > n { n - stepped } else { n };
    let bits = (period.min(near).min(novel) as f64 * per_char) as usize;
    let mut distinct = chars.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    // 32 random hex digits use fewer than 8 of the 16 about once in 10^7 draws.
    if distinct.len() < 8 {
        let by_alphabet = n as f64 * (distinct.len() as f64).log2();
        bits.min(by_alphabet as usize)
    } else {
        bits
    }
}

/// Bits a character of a passphrase (see [`estimated_bits`]): a 128-bit one is about ten
/// random words, 50 characters.
const PHRASE_BITS: f64 = 2.6;

/// Bits a character for text judged by its character classes (see [`estimated_bits`]).
fn class_bits(chars: &[char]) -> f64 {
    let has = |class: fn(&char) -> bool, size: u32| {
        if chars.iter().any(class) {
            size
        } else {
            0
        }
    };
    let mut alphabet = has(char::is_ascii_lowercase, 26)
        + has(char::is_ascii_uppercase, 26)
        + has(char::is_ascii_digit, 10);
    // Printable ASCII has 33 more (punctuation and the space). Non-ASCII counts with them: a
    // token file is UTF-8 text, so it is an accented letter or a symbol someone typed, not
    // a random byte.
    if chars.iter().any(|c| !c.is_ascii_alphanumeric()) {
        alphabet += 33;
    }
    f64::from(alphabet.max(2)).log2()
}

/// The characters before the padding, if `chars` is base64 as encoders write it: a multiple of
/// four long, one or two `=` at the end, and the bits those leave over in the last character
/// zero. The padding says "encoded random bytes" where the character classes cannot:
/// `openssl rand -base64 16` gives 22 characters for its 132 bits, and one in a hundred of them
/// has no digit, `+` or `/`, which by its classes alone (log2(52) a character) falls short of
/// 128.
fn padded_base64_body(chars: &[char]) -> Option<&[char]> {
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    if !chars.len().is_multiple_of(4) {
        return None;
    }
    let pad = chars.iter().rev().take_while(|c| **c == '=').count();
    if !(1..=2).contains(&pad) {
        return None;
    }
    let body = &chars[..chars.len() - pad];
    let values: Option<Vec<usize>> = body.iter().map(|c| ALPHABET.find(*c)).collect();
    // Two `=`: the last character holds 2 bits of data, one `=`: 4; the rest must be zero.
    let unused = if pad == 2 { 0b1111 } else { 0b11 };
    match values?.last() {
        Some(last) if last & unused == 0 => Some(body),
        _ => None,
    }
}

/// `export NAME=` or `VERS_AUTH_TOKEN=` at the start of a token: a shell or environment file
/// line copied whole. Returned up to the `=`, which is all of it that may be shown. Other
/// `NAME=` starts are left alone: random tokens with symbols (`pwgen -sy`) begin like that
/// about once in 200.
fn shell_assignment(t: &str) -> Option<&str> {
    let is_name = |n: &str| {
        n.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let (head, _) = t.split_once('=')?;
    let exported = head
        .strip_prefix("export ")
        .is_some_and(|rest| is_name(rest.trim_start()));
    (exported || head == TOKEN_ENV).then(|| &t[..=head.len()])
}

/// Largest token file read: a token is a line of some dozens of characters.
pub const MAX_TOKEN_FILE: u64 = 4096;

/// Reads a token file, at most [`MAX_TOKEN_FILE`] bytes of it. Not only regular files: a pipe
/// from the shell (`--token-file <(pass show vm-token)`) is a fine way to keep a token off disk.
fn read_capped(path: &Path) -> Result<String, TokenError> {
    let bytes =
        crate::read_at_most(path, MAX_TOKEN_FILE).map_err(|cause| TokenError::Unreadable {
            path: path.display().to_string(),
            cause,
        })?;
    if bytes.len() as u64 > MAX_TOKEN_FILE {
        return Err(TokenError::TooLarge {
            path: path.display().to_string(),
        });
    }
    // Raw random bytes (`openssl rand 32 > file`) read as "stream did not contain valid
    // UTF-8", which did not say what to do.
    String::from_utf8(bytes).map_err(|_| TokenError::Malformed {
        source_name: path.display().to_string(),
        what: "binary data, not text",
    })
}

impl Token {
    /// Builds a token from its text, refusing anything under 128 bits.
    pub fn new(text: &str, source_name: &str) -> Result<Self, TokenError> {
        // A byte-order mark (some Windows editors write one) is not part of the token.
        let t = text.trim_start_matches('\u{feff}').trim();
        let malformed = |what| TokenError::Malformed {
            source_name: source_name.to_owned(),
            what,
        };
        if t.is_empty() {
            return Err(TokenError::Empty {
                source_name: source_name.to_owned(),
            });
        }
        if t.contains(['\n', '\r']) {
            return Err(malformed("more than one line"));
        }
        if t.contains(char::is_control) {
            return Err(malformed("control characters"));
        }
        if let Some(assignment) = shell_assignment(t) {
            return Err(TokenError::ShellLine {
                source_name: source_name.to_owned(),
                assignment: assignment.to_owned(),
            });
        }
        let bits = estimated_bits(t);
        if bits < 128 {
            return Err(TokenError::TooWeak {
                source_name: source_name.to_owned(),
                bits,
            });
        }
        Ok(Self(
            hmac::Key::new(hmac::HMAC_SHA256, t.as_bytes()),
            t.len(),
        ))
    }

    /// The token from `--token-file`, else from `VERS_AUTH_TOKEN`.
    pub fn load(file: Option<&Path>) -> Result<Self, TokenError> {
        if let Some(path) = file {
            let text = read_capped(path)?;
            if let Some(warning) = loose_permissions(path, "token file") {
                tracing::warn!("{warning}");
            }
            return Self::new(&text, &path.display().to_string());
        }
        match std::env::var(TOKEN_ENV) {
            Ok(v) if names_a_file(v.trim()) => Err(TokenError::PathInEnv {
                path: v.trim().to_owned(),
            }),
            Ok(v) if !v.trim().is_empty() => Self::new(&v, TOKEN_ENV),
            // Set, but not text: "no token" would send the user looking for the wrong mistake.
            Err(std::env::VarError::NotUnicode(_)) => Err(TokenError::Malformed {
                source_name: TOKEN_ENV.to_owned(),
                what: "bytes that are not UTF-8 text",
            }),
            _ => Err(TokenError::Missing),
        }
    }

    fn message(challenge: &[u8], host: &str, port: u16) -> Vec<u8> {
        let mut m = Vec::with_capacity(PROTOCOL.len() + challenge.len() + host.len() + 2);
        m.extend_from_slice(PROTOCOL.as_bytes());
        m.extend_from_slice(challenge);
        m.extend_from_slice(host.as_bytes());
        m.extend_from_slice(&port.to_be_bytes());
        m
    }

    /// The client's proof for a challenge.
    pub fn prove(&self, challenge: &[u8], host: &str, port: u16) -> Vec<u8> {
        hmac::sign(&self.0, &Self::message(challenge, host, port))
            .as_ref()
            .to_vec()
    }

    /// The agent's check, in constant time.
    pub fn verify(&self, challenge: &[u8], host: &str, port: u16, proof: &[u8]) -> bool {
        hmac::verify(&self.0, &Self::message(challenge, host, port), proof).is_ok()
    }
}

/// Whether a token's text is the path of an existing file (a bare name too: `token` in the
/// directory forward runs in). A random token names no file.
fn names_a_file(text: &str) -> bool {
    !text.is_empty() && Path::new(text).exists()
}

/// Whether other users of this machine can read a secret file (`what`: "token file"), worded
/// as a warning; as ssh does for private keys, but only a warning: refusing would break
/// set-ups that work today.
pub fn loose_permissions(path: &Path, what: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "{what} {} can be read by other users (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        )
    })
}

/// A fresh random challenge.
pub fn challenge() -> [u8; CHALLENGE_LEN] {
    let mut c = [0u8; CHALLENGE_LEN];
    SystemRandom::new()
        .fill(&mut c)
        .expect("the OS random generator failed");
    c
}

/// Lower-case hex, for the challenge header.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses lower- or upper-case hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The host names an agent answers to (`forward agent --name`): a proof made for any other
/// name is refused, so one relayed from a client that was made to dial another host (or
/// another agent sharing the token) gets nowhere. Empty: every name passes.
#[derive(Debug, Clone, Default)]
pub struct AgentNames(Vec<String>);

impl AgentNames {
    /// Names as typed; compared without case and without a trailing dot.
    pub fn new<S: AsRef<str>>(names: &[S]) -> Self {
        AgentNames(names.iter().map(|n| normal_name(n.as_ref())).collect())
    }

    /// Whether a proof made for `host` may be checked at all.
    pub fn admits(&self, host: &str) -> bool {
        self.0.is_empty() || self.0.contains(&normal_name(host))
    }

    /// The names, for a log line.
    pub fn list(&self) -> String {
        self.0.join(", ")
    }
}

fn normal_name(n: &str) -> String {
    n.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_names_admit_only_their_own() {
        let any = AgentNames::default();
        assert!(any.admits("whatever.example") && any.admits(""));
        let mine = AgentNames::new(&["abc123.vm.vers.sh", "Other.Example."]);
        assert!(mine.admits("ABC123.vm.vers.sh."));
        assert!(mine.admits("other.example"));
        assert!(!mine.admits("evil.vm.vers.sh"));
        assert!(!mine.admits(""));
    }

    const GOOD: &str = "00112233445566778899aabbccddeeff";

    #[test]
    fn proof_verifies_only_for_its_challenge_host_and_port() {
        let t = Token::new(GOOD, "test").unwrap();
        let c1 = challenge();
        let c2 = challenge();
        assert_ne!(c1, c2);
        let p = t.prove(&c1, "vm1.vm.vers.sh", 9999);
        assert!(t.verify(&c1, "vm1.vm.vers.sh", 9999, &p));
        assert!(
            !t.verify(&c2, "vm1.vm.vers.sh", 9999, &p),
            "replay under a new challenge"
        );
        assert!(!t.verify(&c1, "vm2.vm.vers.sh", 9999, &p));
        assert!(!t.verify(&c1, "vm1.vm.vers.sh", 9998, &p));
        let other = Token::new("ffeeddccbbaa99887766554433221100", "test").unwrap();
        assert!(!other.verify(&c1, "vm1.vm.vers.sh", 9999, &p));
    }

    #[test]
    fn a_token_is_one_line_and_a_byte_order_mark_is_not_part_of_it() {
        let e = |text: &str| Token::new(text, "t.txt").unwrap_err().to_string();
        assert_eq!(
            e(""),
            "token from t.txt is empty; put the token in it (generate one with: openssl rand -hex 32)"
        );
        assert!(e(" \n").contains("is empty"));
        let two = format!("{GOOD}\nsecond line\n");
        assert!(
            e(&two).contains("contains more than one line"),
            "{}",
            e(&two)
        );
        assert!(!e(&two).contains(GOOD), "the token leaked");
        assert!(e(&format!("{GOOD}\r\n{GOOD}")).contains("more than one line"));
        assert!(e(&format!("{GOOD}\u{7}")).contains("control characters"));
        // Trailing newline, CRLF, a BOM: the same token.
        let c = challenge();
        let reference = Token::new(GOOD, "x").unwrap().prove(&c, "h", 1);
        for same in [
            format!("{GOOD}\n"),
            format!("{GOOD}\r\n"),
            format!("\u{feff}{GOOD}\n"),
            format!("  {GOOD}  "),
        ] {
            let t = Token::new(&same, "x").unwrap_or_else(|e| panic!("{same:?}: {e}"));
            assert_eq!(t.prove(&c, "h", 1), reference, "{same:?}");
        }
    }

    #[test]
    fn weak_tokens_are_refused_and_never_printed() {
        for weak in [
            "secret",
            "1234",
            "0123456789abcdef",
            "short-token-here",
            "00000000000000000000000000000000",
            "passwordpasswordpasswordpassword",
            "0123456789abcdef0123456789abcdef",
            &"a".repeat(64),
            &"ab".repeat(40),
            // From a review: nearly periodic, and runs.
            "passwordpasswordpasswordpassword1",
            "abcdefghabcdefghabcdefghabcdefghi",
            "abcdefghijklmnopqrstuvwxyz012345",
            // From a tester: words, however many letters they take.
            "thequickbrownfoxjumpsoverthelazydog",
            "correct horse battery staple",
            "my dog is named rex and he is nice",
            "correct horse battery staple and a long saddle",
        ] {
            let e = Token::new(weak, "VERS_AUTH_TOKEN").unwrap_err().to_string();
            assert!(e.contains("at least 128 bits"), "{e}");
            assert!(!e.contains(weak), "the token leaked into {e}");
        }
        // Real ones: `openssl rand -hex 16`, `openssl rand -base64 24`, a long passphrase.
        for strong in [
            "3f1c9a0e7b2d48c6a5e19f0b7d3c2a81",
            "9b7e3a51c0d24f68e1a7b3c95d02f4e6",
            "q2T8vXk1ZpL0s9Hc4RmN7bYw3JfA6dGe",
            "gravel mitten orbit sleek puzzle anthem velvet crisp lantern quota",
        ] {
            Token::new(strong, "test").unwrap_or_else(|e| panic!("{strong}: {e}"));
        }
        let t = Token::new(GOOD, "x").unwrap();
        assert!(!format!("{t:?}").contains(GOOD));
    }

    /// Standard base64 with `=` padding, as `openssl rand -base64` prints it.
    fn base64(bytes: &[u8]) -> String {
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let mut b = [0u8; 3];
            b[..chunk.len()].copy_from_slice(chunk);
            let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn random_tokens_of_128_bits_always_pass() {
        // The strength rules must not refuse what `openssl rand -hex 16|32` or
        // `openssl rand -base64 16|24|32` gives (padding included).
        assert_eq!(base64(b"\xff\xef"), "/+8=");
        assert_eq!(base64(&[0; 16]).len(), 24);
        let rng = SystemRandom::new();
        for len in [16, 32] {
            for _ in 0..20_000 {
                let mut b = vec![0u8; len];
                rng.fill(&mut b).unwrap();
                let hex = to_hex(&b);
                Token::new(&hex, "test").unwrap_or_else(|e| panic!("{hex}: {e}"));
            }
        }
        for len in [16, 24, 32] {
            for _ in 0..20_000 {
                let mut b = vec![0u8; len];
                rng.fill(&mut b).unwrap();
                let text = base64(&b);
                Token::new(&text, "test").unwrap_or_else(|e| panic!("{text}: {e}"));
            }
        }
        // The hardest of them for the classes: 22 characters of data without a digit.
        for edge in ["QxbKtzRnWfYpLmGvHdJsCg==", "q+xbKtzR/nWfYpLmGvHdJw=="] {
            Token::new(edge, "test").unwrap_or_else(|e| panic!("{edge}: {e}"));
        }
    }

    #[test]
    fn human_chosen_tokens_are_judged_by_the_characters_they_use() {
        // From a review: each passed as if every character could have been any of 64 or 256.
        for weak in [
            "Password1234567890!",
            "correcthorsebatterystaple",
            "qwertyuiopasdfghjklzxcvbnm",
            "Password12345678",
            // Padding alone does not make base64: the last character must fit it.
            "correcthorsebatterystap=",
            "correcthorsebatterysta==",
        ] {
            let e = Token::new(weak, "VERS_AUTH_TOKEN").unwrap_err().to_string();
            assert!(
                e.starts_with("token from VERS_AUTH_TOKEN is too weak (")
                    && e.ends_with("bits); use at least 128 bits, e.g. openssl rand -hex 32"),
                "{weak}: {e}"
            );
            assert!(!e.contains(weak), "the token leaked into {e}");
        }
    }

    #[test]
    fn a_shell_line_is_refused_as_such_without_printing_the_token() {
        for (line, shown) in [
            (
                format!("export VERS_AUTH_TOKEN={GOOD}\n"),
                "export VERS_AUTH_TOKEN=",
            ),
            (format!("VERS_AUTH_TOKEN={GOOD}"), "VERS_AUTH_TOKEN="),
            (format!("VERS_AUTH_TOKEN=\"{GOOD}\""), "VERS_AUTH_TOKEN="),
            (format!("export  TOKEN='{GOOD}'"), "export  TOKEN="),
        ] {
            let e = Token::new(&line, "/etc/forward/token")
                .unwrap_err()
                .to_string();
            assert_eq!(
                e,
                format!(
                    "token from /etc/forward/token looks like a shell line ({shown}...); it must \
                     hold only the token itself, without the variable name (e.g. what openssl \
                     rand -hex 32 prints)"
                ),
                "{line}"
            );
            assert!(!e.contains(GOOD), "the token leaked into {e}");
        }
        // The same words fit the variable: `VERS_AUTH_TOKEN="VERS_AUTH_TOKEN=…"`.
        let e = Token::new(&format!("VERS_AUTH_TOKEN={GOOD}"), TOKEN_ENV)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("token from VERS_AUTH_TOKEN looks like a shell line"),
            "{e}"
        );
        // Tokens with `=` in them are still tokens.
        for fine in [
            "Xk2+9fQ/aLmR7tZp0WcYbN==",
            "AB_C=9fQ/aLmR7tZp0WcYbNe4uVhJ",
            "export=9fQ/aLmR7tZp0WcYbNe4uVhJ",
        ] {
            let r = Token::new(fine, "test");
            assert!(
                !matches!(r, Err(TokenError::ShellLine { .. })),
                "{fine}: {r:?}"
            );
        }
    }

    #[test]
    fn token_files_readable_by_others_are_flagged() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("forward-token-{}", std::process::id()));
        std::fs::write(&path, GOOD).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = loose_permissions(&path, "token file").expect("0644 is flagged");
        assert!(w.contains("mode 644") && w.contains("chmod 600"), "{w}");
        assert!(!w.contains(GOOD), "the token leaked into {w}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(loose_permissions(&path, "token file"), None);
        assert!(Token::load(Some(&path)).is_ok());
        std::fs::remove_file(&path).unwrap();
    }

    /// A bare file name in `VERS_AUTH_TOKEN` (a file in the working directory) is the path
    /// mistake too.
    #[test]
    fn a_file_name_is_not_a_token() {
        assert!(names_a_file("Cargo.toml"));
        assert!(names_a_file("/"));
        assert!(!names_a_file(
            "9c41e07a2bd35f86c1e94a7d0b3f52e8a6d17c04f9b25e3a"
        ));
        assert!(!names_a_file(""));
    }

    /// `openssl rand 32 > file` (raw bytes) is named as binary, with what to write instead.
    #[test]
    fn a_binary_token_file_says_so() {
        let path = std::env::temp_dir().join(format!("forward-token-bin-{}", std::process::id()));
        std::fs::write(&path, [0x9c, 0xff, 0x00, 0x41, 0xfe, 0x80]).unwrap();
        let e = Token::load(Some(&path)).map(drop).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            e.contains("binary data, not text") && e.contains("openssl rand -hex 32"),
            "{e}"
        );
    }

    #[test]
    fn hex_round_trip() {
        let c = challenge();
        assert_eq!(from_hex(&to_hex(&c)).unwrap(), c);
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
    }
}
