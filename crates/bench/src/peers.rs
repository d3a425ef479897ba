//! The peer tools forward is compared with: stunnel (client mode, through the same edge and
//! with the same verification), socat (plain relay, no TLS) and ssh -L through a local sshd.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::paths::{Env, DOMAIN, VM};
use crate::process::{self, drain, wait_port, Proc, Side};

const READY: Duration = Duration::from_secs(15);
const SSHD: &str = "/usr/sbin/sshd";

pub fn stunnel_bin() -> Option<PathBuf> {
    process::which("stunnel4").or_else(|| process::which("stunnel"))
}

/// The stunnel configuration: verified TLS to the edge with the VM's name as SNI, exactly what
/// forward's direct mode does, so the two are compared like for like.
pub fn stunnel_config(accept: SocketAddr, connect: SocketAddr, ca: &Path) -> String {
    format!(
        "foreground = yes\n\
         pid =\n\
         debug = 3\n\
         [forward-bench]\n\
         client = yes\n\
         accept = {accept}\n\
         connect = {host}:{port}\n\
         sni = {VM}.{DOMAIN}\n\
         CAfile = {ca}\n\
         verifyChain = yes\n\
         checkHost = {VM}.{DOMAIN}\n\
         socket = l:TCP_NODELAY=1\n\
         socket = r:TCP_NODELAY=1\n",
        ca = ca.display(),
        // stunnel splits host and port at the last colon and resolves "[::1]" as a name.
        host = connect.ip(),
        port = connect.port(),
    )
}

pub async fn start_stunnel(
    env: &Env,
    ca: &Path,
    connect: SocketAddr,
    log: &Path,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<SocketAddr> {
    let bin = stunnel_bin().context("stunnel not installed")?;
    let accept = SocketAddr::from(([127, 0, 0, 1], process::free_port()?));
    let conf = env.tmp.join("stunnel.conf");
    std::fs::write(&conf, stunnel_config(accept, connect, ca))?;
    let (mut p, lines) = Proc::spawn(
        "stunnel",
        Side::Client,
        &bin,
        &[conf.display().to_string()],
        log.into(),
    )?;
    drain(lines);
    wait_port(&mut p, accept, READY).await?;
    procs.push(p);
    Ok(accept)
}

pub async fn start_socat(
    connect: SocketAddr,
    log: &Path,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<SocketAddr> {
    let bin = process::which("socat").context("socat not installed")?;
    let port = process::free_port()?;
    let target = match connect {
        SocketAddr::V6(a) => format!("TCP6:[{}]:{},nodelay", a.ip(), a.port()),
        SocketAddr::V4(a) => format!("TCP4:{a},nodelay"),
    };
    // socat's default 8 KiB buffer would make it look slower than it is; 128 KiB is fair.
    let args = vec![
        "-b".to_string(),
        "131072".into(),
        format!("TCP4-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay"),
        target,
    ];
    let (mut p, lines) = Proc::spawn("socat", Side::Client, &bin, &args, log.into())?;
    drain(lines);
    let accept = SocketAddr::from(([127, 0, 0, 1], port));
    wait_port(&mut p, accept, READY).await?;
    procs.push(p);
    Ok(accept)
}

pub fn ssh_unavailable() -> Option<String> {
    if process::which("ssh").is_none() || !Path::new(SSHD).is_file() {
        return Some(
            "ssh or /usr/sbin/sshd not installed (apt-get install openssh-client openssh-server)"
                .into(),
        );
    }
    if process::which("ssh-keygen").is_none() {
        return Some("ssh-keygen not installed".into());
    }
    None
}

/// Generates the host and client keys once per run.
fn ssh_keys(env: &Env) -> anyhow::Result<PathBuf> {
    let dir = env.tmp.join("ssh");
    if dir.join("client").is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir)?;
    for name in ["host", "client"] {
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(name))
            .output()
            .context("ssh-keygen")?;
        if !out.status.success() {
            bail!(
                "ssh-keygen failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys"))?;
    Ok(dir)
}

/// sshd on [::1] with a throwaway host key; needs root (it switches users to authenticate).
pub async fn start_sshd(
    env: &Env,
    log: &Path,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<SocketAddr> {
    let dir = ssh_keys(env)?;
    let port = process::free_port()?;
    let addr = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    let conf = dir.join("sshd_config");
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListenAddress ::1\nHostKey {d}/host\nPidFile none\n\
             StrictModes no\nPermitRootLogin yes\nAuthorizedKeysFile {d}/authorized_keys\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             AllowTcpForwarding yes\nLogLevel ERROR\nMaxStartups 100\n",
            d = dir.display()
        ),
    )?;
    // sshd refuses to start without its privilege separation directory.
    let _ = std::fs::create_dir_all("/run/sshd");
    let args = vec![
        "-D".to_string(),
        "-e".into(),
        "-f".into(),
        conf.display().to_string(),
    ];
    let (mut p, lines) = Proc::spawn("sshd", Side::Server, Path::new(SSHD), &args, log.into())?;
    drain(lines);
    wait_port(&mut p, addr, READY).await?;
    procs.push(p);
    Ok(addr)
}

pub async fn start_ssh(
    env: &Env,
    connect: SocketAddr,
    log: &Path,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<SocketAddr> {
    let dir = env.tmp.join("ssh");
    let port = process::free_port()?;
    let b = env.backend;
    let args = vec![
        "-N".to_string(),
        "-F".into(),
        "/dev/null".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "StrictHostKeyChecking=no".into(),
        "-o".into(),
        "UserKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "ExitOnForwardFailure=yes".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
        "-i".into(),
        dir.join("client").display().to_string(),
        "-p".into(),
        connect.port().to_string(),
        "-L".into(),
        format!("127.0.0.1:{port}:[{}]:{}", b.ip(), b.port()),
        format!("root@{}", connect.ip()),
    ];
    let (mut p, lines) = Proc::spawn("ssh", Side::Client, Path::new("ssh"), &args, log.into())?;
    drain(lines);
    let accept = SocketAddr::from(([127, 0, 0, 1], port));
    wait_port(&mut p, accept, READY).await?;
    procs.push(p);
    Ok(accept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stunnel_config_verifies_the_vm_name() {
        let c = stunnel_config(
            "127.0.0.1:4000".parse().unwrap(),
            "127.0.0.1:5000".parse().unwrap(),
            Path::new("/tmp/ca.pem"),
        );
        assert!(c.contains("client = yes"));
        assert!(c.contains("sni = vm1.vm.vers.sh"));
        assert!(c.contains("checkHost = vm1.vm.vers.sh"));
        assert!(c.contains("verifyChain = yes"));
        assert!(c.contains("CAfile = /tmp/ca.pem"));
        assert!(c.contains("connect = 127.0.0.1:5000"));
        let c = stunnel_config(
            "127.0.0.1:4000".parse().unwrap(),
            "[fd00::3]:5000".parse().unwrap(),
            Path::new("/tmp/ca.pem"),
        );
        assert!(c.contains("connect = fd00::3:5000\n"), "{c}");
    }
}
