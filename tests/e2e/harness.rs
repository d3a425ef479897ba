//! Process and file-system plumbing shared by every scenario: temp dirs that clean up, child
//! processes that are killed on drop and whose output can be waited on, and small facts about the
//! machine (root or not, where PostgreSQL lives).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long any single wait in the suite may take. Generous on purpose: CI is a loaded 2-core
/// machine and these tests assert behaviour, never speed.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub fn forward_bin() -> &'static str {
    env!("CARGO_BIN_EXE_forward")
}

/// What every `forward` a test starts gets, also when a wrapper (a shell) execs it: no stdin,
/// logs at `filter` (a RUST_LOG value) without colour.
pub fn forward_env(cmd: &mut Command, filter: &str) {
    cmd.stdin(Stdio::null());
    // Keep the child's logs readable in failure output; a developer's RUST_LOG still wins.
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", filter);
    }
    cmd.env("NO_COLOR", "1");
}

/// A directory under the system temp dir, removed with everything in it on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "forward-e2e-{tag}-{}-{}-{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Src {
    Stdout,
    Stderr,
}

/// Everything a child wrote, line by line, plus how many of its pipes are still open.
#[derive(Default)]
struct Output {
    lines: Mutex<(Vec<(Src, String)>, usize)>,
    changed: Condvar,
}

/// A child process that is killed when dropped (first `stop_signal` for a clean shutdown if set, then
/// SIGKILL). Its stdout and stderr are collected so tests can wait for readiness lines and so a
/// failing test prints what the child said.
pub struct Proc {
    name: String,
    child: Child,
    output: Arc<Output>,
    stop_signal: Option<&'static str>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr captured line by line. stdin is inherited unless the
    /// caller set it (use `Stdio::piped()` and `take_stdin` to feed it).
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped());
        let mut proc = Proc::spawn_inner(name, cmd);
        let stdout = proc.child.stdout.take().unwrap();
        proc.output.lines.lock().unwrap().1 += 1;
        collect(stdout, Src::Stdout, &proc.output);
        proc
    }

    /// Like `spawn`, but hands the raw stdout pipe to the caller (binary data).
    pub fn spawn_raw_stdout(name: &str, mut cmd: Command) -> (Proc, ChildStdout) {
        cmd.stdout(Stdio::piped());
        let mut proc = Proc::spawn_inner(name, cmd);
        let stdout = proc.child.stdout.take().unwrap();
        (proc, stdout)
    }

    /// Like `spawn`, with stdin and stdout as the caller set them (its own pipes); only
    /// stderr is collected.
    pub fn spawn_own_stdio(name: &str, cmd: Command) -> Proc {
        Proc::spawn_inner(name, cmd)
    }

    fn spawn_inner(name: &str, mut cmd: Command) -> Proc {
        cmd.stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {:?}: {e}", cmd.get_program()));
        let output = Arc::new(Output::default());
        output.lines.lock().unwrap().1 = 1;
        collect(child.stderr.take().unwrap(), Src::Stderr, &output);
        Proc {
            name: name.to_string(),
            child,
            output,
            stop_signal: None,
            status: None,
        }
    }

    /// Spawns `forward ARGS...`.
    pub fn forward<I, S>(name: &str, args: I) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Proc::forward_logging(name, args, "info")
    }

    /// Spawns `forward ARGS...` logging at `filter` (a RUST_LOG value), for a test that reads
    /// a debug line.
    pub fn forward_logging<I, S>(name: &str, args: I, filter: &str) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(forward_bin());
        cmd.args(args);
        forward_env(&mut cmd, filter);
        Proc::spawn(name, cmd)
    }

    /// On drop, send this signal first (e.g. "INT" for PostgreSQL's fast shutdown).
    pub fn stop_with(mut self, signal: &'static str) -> Proc {
        self.stop_signal = Some(signal);
        self
    }

    /// Resident memory of the process in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("{}: read /proc status: {e}", self.name));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{}: no VmRSS in /proc status", self.name))
    }

    pub fn take_stdin(&mut self) -> ChildStdin {
        self.child.stdin.take().expect("stdin was not piped")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `count` lines from `src` satisfy `pred` and returns them; panics (with the
    /// child's output) if the child exits first or TIMEOUT passes.
    pub fn wait_lines(
        &mut self,
        src: Src,
        count: usize,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + TIMEOUT;
        let mut guard = self.output.lines.lock().unwrap();
        loop {
            let found: Vec<String> = guard
                .0
                .iter()
                .filter(|(s, l)| *s == src && pred(l))
                .map(|(_, l)| l.clone())
                .take(count)
                .collect();
            if found.len() == count {
                return found;
            }
            let now = Instant::now();
            if guard.1 == 0 || now >= deadline {
                drop(guard);
                let status = self.try_status();
                // The output follows from Drop, which prints the transcript while unwinding.
                panic!(
                    "{}: waited for {what} but {}",
                    self.name,
                    match status {
                        Some(st) => format!("it exited ({st})"),
                        None if now >= deadline => format!("{TIMEOUT:?} passed"),
                        None => "it closed its output".to_string(),
                    },
                );
            }
            guard = self
                .output
                .changed
                .wait_timeout(guard, (deadline - now).min(Duration::from_millis(500)))
                .unwrap()
                .0;
        }
    }

    pub fn wait_line(&mut self, src: Src, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_lines(src, 1, what, pred).remove(0)
    }

    /// Everything the child printed so far, for failure messages.
    pub fn transcript(&self) -> String {
        let guard = self.output.lines.lock().unwrap();
        let mut text = format!("---- output of {} ----\n", self.name);
        for (src, line) in &guard.0 {
            let tag = if *src == Src::Stdout { "out" } else { "err" };
            text.push_str(&format!("[{tag}] {line}\n"));
        }
        text
    }

    pub fn stderr_text(&self) -> String {
        self.text_of(Src::Stderr)
    }

    pub fn stdout_text(&self) -> String {
        self.text_of(Src::Stdout)
    }

    fn text_of(&self, want: Src) -> String {
        let guard = self.output.lines.lock().unwrap();
        guard
            .0
            .iter()
            .filter(|(s, _)| *s == want)
            .map(|(_, l)| format!("{l}\n"))
            .collect()
    }

    /// Sends a signal by name ("TERM", "KILL", ...) through kill(1), which keeps the suite free of
    /// unsafe libc calls.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .stderr(Stdio::null())
            .status()
            .expect("run kill");
        assert!(
            st.success() || self.status.is_some(),
            "kill -{sig} {} failed",
            self.name
        );
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Ctrl-C, then the exit: 0, and no panic on the way.
    pub fn interrupt_cleanly(&mut self) {
        self.signal("INT");
        let st = self.wait_exit();
        assert!(st.success(), "{}: {st}: {}", self.name, self.transcript());
        assert!(
            !self.stderr_text().contains("panicked"),
            "{}",
            self.transcript()
        );
    }

    /// Waits for the child to exit; panics with its output after TIMEOUT.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(st) = self.try_status() {
                // The pipes close with the process; let the collectors catch the last lines.
                self.wait_output_closed(Duration::from_secs(5));
                return st;
            }
            if Instant::now() >= deadline {
                panic!("{}: did not exit within {TIMEOUT:?}", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_output_closed(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut guard = self.output.lines.lock().unwrap();
        while guard.1 > 0 && Instant::now() < deadline {
            guard = self
                .output
                .changed
                .wait_timeout(guard, Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }

    pub fn kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.transcript());
        }
        if self.try_status().is_some() {
            return;
        }
        if let Some(sig) = self.stop_signal {
            self.signal(sig);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if self.try_status().is_some() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

fn collect(pipe: impl Read + Send + 'static, src: Src, output: &Arc<Output>) {
    let output = Arc::clone(output);
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    output.lines.lock().unwrap().0.push((src, line));
                    output.changed.notify_all();
                }
            }
        }
        output.lines.lock().unwrap().1 -= 1;
        output.changed.notify_all();
    });
}

/// Runs a command to completion with a TIMEOUT, returning (status, stdout, stderr).
pub fn run(name: &str, mut cmd: Command) -> (ExitStatus, String, String) {
    cmd.stdin(Stdio::null());
    let mut proc = Proc::spawn(name, cmd);
    let status = proc.wait_exit();
    (status, proc.stdout_text(), proc.stderr_text())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// uid and gid of a local account, from /etc/passwd.
pub fn account(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() > 3 && f[0] == user {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

/// Skips a test that needs something this machine lacks, unless we are root (CI), where it must
/// run: there the reason becomes a failure.
pub fn skip_unless_root(reason: &str) -> bool {
    if is_root() {
        panic!("cannot run although running as root (CI must run this test): {reason}");
    }
    eprintln!("SKIPPED (not root): {reason}");
    true
}

/// A port that was free on [::1] a moment ago, for servers that cannot be told to bind port 0 and
/// report it (sshd). The edge then listens on 127.0.0.1 with the same number, as at Vers.
pub fn free_v6_port() -> u16 {
    let l = std::net::TcpListener::bind("[::1]:0").expect("bind [::1]:0");
    l.local_addr().unwrap().port()
}
