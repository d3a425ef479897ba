//! Raising the open-file limit for the scale test without unsafe code: `prlimit(1)` changes
//! the limit of this running process, and children inherit it.

use std::process::Command;

/// Soft and hard "Max open files" from /proc/self/limits text.
pub fn parse_nofile(limits: &str) -> Option<(u64, u64)> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut nums = line["Max open files".len()..].split_whitespace().map(|v| {
        if v == "unlimited" {
            Some(u64::MAX)
        } else {
            v.parse().ok()
        }
    });
    Some((nums.next()??, nums.next()??))
}

pub fn nofile() -> Option<(u64, u64)> {
    parse_nofile(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

/// Tries to make the soft limit at least `want` (raising the hard limit too when allowed);
/// returns the soft limit in force afterwards.
pub fn raise_nofile(want: u64) -> u64 {
    let Some((soft, hard)) = nofile() else {
        return 0;
    };
    if soft >= want {
        return soft;
    }
    let pid = std::process::id().to_string();
    for (s, h) in [(want, want.max(hard)), (hard.min(want), hard)] {
        let ok = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={s}:{h}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            break;
        }
    }
    nofile().map(|(s, _)| s).unwrap_or(soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(parse_nofile(text), Some((1024, 524288)));
        assert_eq!(parse_nofile("nothing"), None);
        assert!(nofile().is_some());
    }
}
