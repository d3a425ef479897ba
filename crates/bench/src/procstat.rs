//! CPU time and memory of the tunnel processes, read from /proc. A path's processes are the
//! ones the harness spawned plus all their descendants (sshd and socat fork per connection).

use std::collections::HashMap;
use std::process::Command;

/// CPU ticks of one process: its own plus those of children it has reaped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ticks {
    pub utime: u64,
    pub stime: u64,
    pub cutime: u64,
    pub cstime: u64,
}

impl Ticks {
    pub fn total(&self) -> u64 {
        self.utime + self.stime + self.cutime + self.cstime
    }
}

/// Fields of /proc/PID/stat the harness uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub ppid: u32,
    pub ticks: Ticks,
}

/// Parses /proc/PID/stat. The command name is in parentheses and may itself contain spaces
/// and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17);
    // `fields[0]` is field 3.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    Some(Stat {
        ppid: field(4)? as u32,
        ticks: Ticks {
            utime: field(14)?,
            stime: field(15)?,
            cutime: field(16)?,
            cstime: field(17)?,
        },
    })
}

/// Resident and peak resident memory in KiB from /proc/PID/status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mem {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn parse_status(text: &str) -> Mem {
    let mut mem = Mem::default();
    for line in text.lines() {
        let value = |l: &str| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if line.starts_with("VmRSS:") {
            mem.rss_kib = value(line);
        } else if line.starts_with("VmHWM:") {
            mem.hwm_kib = value(line);
        }
    }
    mem
}

/// Proportional set size in KiB from /proc/PID/smaps_rollup: shared pages split between the
/// processes sharing them, so a forking peer is not charged its libraries once per child.
pub fn parse_pss(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

pub fn pss(pid: u32) -> Option<u64> {
    parse_pss(&std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?)
}

pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

pub fn mem(pid: u32) -> Option<Mem> {
    Some(parse_status(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
    ))
}

/// `roots` and every process descending from them.
pub fn tree(roots: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(s) = stat(pid) {
                children.entry(s.ppid).or_default().push(pid);
            }
        }
    }
    let mut out: Vec<u32> = roots.to_vec();
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = children.get(&out[i]) {
            out.extend(kids.iter().copied().filter(|k| !roots.contains(k)));
        }
        i += 1;
    }
    out
}

/// Summed CPU ticks and memory over a process tree at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub ticks: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub pss_kib: u64,
}

pub fn sample(roots: &[u32]) -> Sample {
    let mut s = Sample::default();
    for pid in tree(roots) {
        if let Some(st) = stat(pid) {
            s.ticks += st.ticks.total();
        }
        if let Some(m) = mem(pid) {
            s.rss_kib += m.rss_kib;
            s.hwm_kib += m.hwm_kib;
        }
        s.pss_kib += pss(pid).unwrap_or(0);
    }
    s
}

/// Clock ticks per second for the tick fields (`getconf CLK_TCK`; 100 on every Linux we know).
pub fn clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_the_name() {
        let line = "4242 (my (odd) proc) S 17 4242 4242 0 -1 4194560 500 0 0 0 \
                    123 45 6 7 20 0 4 0 1000 123456789 512 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.ppid, 17);
        assert_eq!(
            s.ticks,
            Ticks {
                utime: 123,
                stime: 45,
                cutime: 6,
                cstime: 7
            }
        );
        assert_eq!(s.ticks.total(), 181);
    }

    #[test]
    fn truncated_stat_is_none() {
        assert_eq!(parse_stat("1 (x) S 0 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn status_rss_and_hwm() {
        let text = "Name:\tforward\nVmPeak:\t 9999 kB\nVmHWM:\t    8120 kB\nVmRSS:\t    7004 kB\n";
        assert_eq!(
            parse_status(text),
            Mem {
                rss_kib: 7004,
                hwm_kib: 8120
            }
        );
    }

    #[test]
    fn pss_from_smaps_rollup() {
        let text = "555a57caa000-7ffff2d9b000 ---p 00000000 00:00 0 [rollup]\nRss:  1724 kB\nPss:   239 kB\nPss_Dirty: 116 kB\n";
        assert_eq!(parse_pss(text), Some(239));
        assert_eq!(parse_pss("Rss: 1 kB"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(stat(me).is_some());
        assert!(mem(me).unwrap().rss_kib > 0);
        assert!(tree(&[me]).contains(&me));
    }
}
