//! Child processes of a path (forward, the edge, the agent, peers): spawned with their stderr
//! in a log file, killed when dropped, with helpers to wait until they are ready.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::Instant;

/// Which side of the emulated internet a process stands on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Runs on the user's machine (forward, stunnel, ssh, socat).
    Client,
    /// Stands in for the edge or runs on the VM (forward edge, the agent, sshd).
    Server,
}

pub struct Proc {
    pub name: String,
    pub side: Side,
    pub pid: u32,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Spawns `program args` with stdout piped (returned as lines) and stderr in `log`.
    pub fn spawn(
        name: &str,
        side: Side,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> anyhow::Result<(Proc, Lines<BufReader<ChildStdout>>)> {
        let err = std::fs::File::create(&log)
            .with_context(|| format!("cannot create log file {}", log.display()))?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            // Per-connection info logs would cost the tunnels CPU the peers do not pay.
            // FORWARD_BENCH_LOG overrides it for a diagnosis run (with --keep-logs).
            .env(
                "RUST_LOG",
                std::env::var("FORWARD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("{name} exited at once"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        Ok((
            Proc {
                name: name.to_string(),
                side,
                pid,
                child,
                log,
            },
            BufReader::new(stdout).lines(),
        ))
    }

    /// The line of stderr that best explains a failure (the last one mentioning an error,
    /// else the last non-empty one), for one-line notes.
    pub fn last_log_line(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines
            .iter()
            .rev()
            .find(|l| l.to_ascii_lowercase().contains("error"))
            .or(lines.last())
            .map(|l| l.trim().to_string())
            .unwrap_or_default()
    }

    /// Error out with the process's own last words if it has already exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!("{} exited ({status}): {}", self.name, self.last_log_line());
        }
        Ok(())
    }

    /// Kills the process and waits for it, so its ports are free for the next path.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Reads stdout lines until `want` returns a value; keeps draining the rest in the background
/// so the child never blocks on a full pipe.
pub async fn wait_line<T>(
    proc: &mut Proc,
    mut lines: Lines<BufReader<ChildStdout>>,
    timeout: Duration,
    mut want: impl FnMut(&str) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                if let Some(v) = want(&line) {
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    return Ok(v);
                }
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                proc.check_alive()?;
                bail!(
                    "{} closed its stdout before it was ready: {}",
                    proc.name,
                    proc.last_log_line()
                );
            }
            Err(_) => {
                proc.check_alive()?;
                bail!(
                    "{} was not ready after {timeout:?}: {}",
                    proc.name,
                    proc.last_log_line()
                );
            }
        }
    }
}

/// Polls until `addr` accepts a TCP connection (for programs that print nothing when ready).
pub async fn wait_port(proc: &mut Proc, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        proc.check_alive()?;
        if Instant::now() >= deadline {
            bail!(
                "{} did not listen on {addr} within {timeout:?}: {}",
                proc.name,
                proc.last_log_line()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port free on both loopback families right now (the edge binds 127.0.0.1:P and forwards
/// to [::1]:P, so a port used by both sides must be free on both).
pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let v6 = std::net::TcpListener::bind("[::1]:0")?;
        let port = v6.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.2", port)).is_ok()
            && std::net::UdpSocket::bind(("::1", port)).is_ok()
        {
            return Ok(port);
        }
    }
    bail!("no free loopback port found")
}

/// `program` on PATH, or None.
pub fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// Keeps reading a child's stdout so it never blocks on a full pipe.
pub fn drain(mut lines: Lines<BufReader<ChildStdout>>) {
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
}
