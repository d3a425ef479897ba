//! The open-file limit.
//!
//! Every connection costs descriptors: two per local connection in direct mode (the local
//! socket and the one to the edge), one per stream on either end of an agent carrier. The soft
//! limit most processes start with is far below what forward serves: 1024 on a Linux desktop
//! under systemd, 256 on macOS, so a direct forward stopped at about 500 concurrent connections
//! (about 120 on macOS, fewer than a `pgbench -c 200` opens) while the hard limit allowed
//! hundreds of times more (524288 under systemd). A process may raise its soft limit up to its
//! hard limit without privileges, and Go's runtime does so for every Go program (`kubectl
//! port-forward`, `cloudflared`), so forward does it at start too.

use std::io;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// macOS refuses a soft limit above `OPEN_MAX` when the hard limit is unlimited.
const OPEN_MAX_MACOS: u64 = 10_240;

/// Linux's default ceiling (`fs.nr_open`), tried when the hard limit says unlimited.
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// Soft limits to try, best first, to take `soft` up to `hard` (`None`: unlimited). Empty when
/// there is nothing to gain.
pub(crate) fn candidates(soft: Option<u64>, hard: Option<u64>) -> Vec<u64> {
    let Some(soft) = soft else {
        return Vec::new();
    };
    let mut tries = match hard {
        Some(hard) => vec![hard, hard.min(OPEN_MAX_MACOS)],
        None => vec![NR_OPEN_DEFAULT, OPEN_MAX_MACOS],
    };
    tries.retain(|&t| t > soft);
    tries.dedup();
    tries
}

/// Raises this process's soft open-file limit as far as its hard limit allows (what it did is
/// logged at debug level); call once at start. Children would inherit the raised limit, which
/// a program using `select(2)` does not expect; forward starts none.
pub fn raise_open_files() {
    let now = getrlimit(Resource::Nofile);
    let tries = candidates(now.current, now.maximum);
    if tries.is_empty() {
        tracing::debug!(limit = %shown(now.current), "open-file limit");
        return;
    }
    for want in tries {
        let new = Rlimit {
            current: Some(want),
            maximum: now.maximum,
        };
        if setrlimit(Resource::Nofile, new).is_ok() {
            tracing::debug!(from = %shown(now.current), to = want, "raised the open-file limit");
            return;
        }
    }
    tracing::debug!(limit = %shown(now.current), "the system refused a higher open-file limit");
}

/// A limit as a log shows it: `Some(20000)` was Rust's debug form.
fn shown(limit: Option<u64>) -> String {
    limit.map_or_else(|| "unlimited".to_owned(), |l| l.to_string())
}

/// For an error that means "out of descriptors" (EMFILE, ENFILE): what to tell the user, with
/// the limit in force. `None` for any other error.
pub fn out_of_files_hint(e: &io::Error) -> Option<String> {
    let code = e.raw_os_error()?;
    if code == rustix::io::Errno::MFILE.raw_os_error() {
        let limit = getrlimit(Resource::Nofile)
            .current
            .map_or_else(|| "unlimited".to_string(), |n| n.to_string());
        Some(format!(
            "the open-file limit ({limit}) is reached: start forward with a higher one \
             (ulimit -n; LimitNOFILE= in a systemd unit)"
        ))
    } else if code == rustix::io::Errno::NFILE.raw_os_error() {
        Some("the system's table of open files is full (fs.file-max)".to_string())
    } else {
        None
    }
}

/// [`out_of_files_hint`] behind `sep`, to append to a message; empty for any other error.
pub(crate) fn out_of_files_suffix(e: &io::Error, sep: &str) -> String {
    out_of_files_hint(e)
        .map(|h| format!("{sep}{h}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_go_to_the_hard_limit_then_to_what_macos_allows() {
        assert_eq!(candidates(Some(1024), Some(524_288)), [524_288, 10_240]);
        assert_eq!(candidates(Some(256), None), [1 << 20, 10_240]);
        assert_eq!(candidates(Some(64), Some(4096)), [4096]);
        assert_eq!(candidates(Some(20_000), Some(20_000)), Vec::<u64>::new());
        assert_eq!(candidates(Some(20_000), Some(30_000)), [30_000]);
        assert_eq!(candidates(None, None), Vec::<u64>::new());
        assert_eq!(candidates(Some(1 << 20), None), [] as [u64; 0]);
    }

    #[test]
    fn the_hint_names_the_limit_for_emfile_only() {
        let emfile = io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        let hint = out_of_files_hint(&emfile).expect("EMFILE has a hint");
        assert!(hint.contains("ulimit -n"), "{hint}");
        let limit = getrlimit(Resource::Nofile).current.unwrap();
        assert!(
            hint.contains(&format!("limit ({limit}) is reached")),
            "{hint}"
        );
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(out_of_files_hint(&refused), None);
        let enfile = io::Error::from_raw_os_error(rustix::io::Errno::NFILE.raw_os_error());
        assert!(out_of_files_hint(&enfile).unwrap().contains("fs.file-max"));
    }
}
