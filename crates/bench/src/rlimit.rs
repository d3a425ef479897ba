//! Raising the open-file limit for the scale test: children (the tunnels under test) inherit it.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// `None` (unlimited) as the largest number, for comparisons.
fn finite(limit: Option<u64>) -> u64 {
    limit.unwrap_or(u64::MAX)
}

/// Tries to make the soft limit at least `want`, raising the hard limit too when allowed (as
/// root), else going as far as the hard limit; returns the soft limit in force afterwards.
pub fn raise_nofile(want: u64) -> u64 {
    let now = getrlimit(Resource::Nofile);
    let (soft, hard) = (finite(now.current), finite(now.maximum));
    if soft >= want {
        return soft;
    }
    for (s, h) in [(want, want.max(hard)), (hard.min(want), hard)] {
        let new = Rlimit {
            current: Some(s),
            maximum: (h != u64::MAX).then_some(h),
        };
        if setrlimit(Resource::Nofile, new).is_ok() {
            break;
        }
    }
    finite(getrlimit(Resource::Nofile).current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_goes_up_to_the_hard_one_without_privileges() {
        let hard = finite(getrlimit(Resource::Nofile).maximum);
        let want = hard.min(1 << 20);
        assert_eq!(raise_nofile(want), want);
        assert_eq!(raise_nofile(16), want, "never lowered");
    }
}
