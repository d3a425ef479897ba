//! OpenSSH through `forward stdio` as ProxyCommand, against a private sshd listening on [::1].

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;

use crate::harness::{forward_bin, free_v6_port, is_root, run, Proc, Src, TempDir};
use crate::net::{hex, Payload};
use crate::stack::{Stack, Transport, VM_FQDN};

per_transport!(ssh_with_forward_stdio_proxycommand);

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn keygen(path: &Path) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path);
    let (st, out, err) = run("ssh-keygen", cmd);
    assert!(st.success(), "ssh-keygen failed: {out}{err}");
}

struct Sshd {
    port: u16,
    key: std::path::PathBuf,
    _server: Proc,
}

fn start_sshd(dir: &TempDir) -> Sshd {
    keygen(&dir.join("host_key"));
    let key = dir.join("client_key");
    keygen(&key);
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
    // sshd's privilege separation needs this directory; it is normally made by the init script.
    std::fs::create_dir_all("/run/sshd").unwrap();

    let port = free_v6_port();
    let config = format!(
        "ListenAddress ::1\nPort {port}\nHostKey {hk}\nPidFile none\nUsePAM no\nStrictModes no\n\
         PermitRootLogin yes\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nAuthorizedKeysFile {ak}\nLogLevel VERBOSE\n",
        hk = dir.join("host_key").display(),
        ak = dir.join("authorized_keys").display(),
    );
    let cfg = dir.join("sshd_config");
    std::fs::write(&cfg, config).unwrap();
    let mut cmd = Command::new("/usr/sbin/sshd");
    cmd.args(["-D", "-e", "-f"]).arg(&cfg).stdin(Stdio::null());
    let mut server = Proc::spawn("sshd", cmd);
    server.wait_line(Src::Stderr, "sshd listening", |l| {
        l.contains("Server listening on ::1 port")
    });
    Sshd {
        port,
        key,
        _server: server,
    }
}

fn ssh_with_forward_stdio_proxycommand(t: Transport) {
    if !is_root() {
        eprintln!("SKIPPED (not root): sshd must run as root to log in with a temp key");
        return;
    }
    assert!(
        Path::new("/usr/sbin/sshd").is_file(),
        "/usr/sbin/sshd missing (run scripts/test-env.sh)"
    );
    let dir = TempDir::new("ssh");
    let sshd = start_sshd(&dir);
    let stack = Stack::start(t, &[sshd.port]);

    let mut proxy = format!("{} stdio", quote(forward_bin()));
    for a in stack.client_args() {
        proxy.push(' ');
        proxy.push_str(&quote(a.to_str().unwrap()));
    }
    proxy.push_str(" %h:%p");

    let ssh = |remote: &str| {
        let mut cmd = Command::new("ssh");
        cmd.args(["-F", "/dev/null", "-i"])
            .arg(&sshd.key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=30",
            ])
            .arg("-o")
            .arg(format!("ProxyCommand={proxy}"))
            .args(["-p", &stack.rport(sshd.port).to_string()])
            .arg(format!("root@{VM_FQDN}"))
            .arg(remote);
        cmd
    };

    let (st, out, err) = run("ssh", ssh("echo hello-$((6*7))"));
    assert!(st.success(), "ssh failed ({st}):\n{out}\n{err}");
    assert_eq!(out.trim(), "hello-42", "ssh stderr:\n{err}");

    // A few MiB through the session, checked on the far side.
    let seed = rand::random();
    let len = 4 * 1024 * 1024;
    let mut cmd = ssh("sha256sum");
    cmd.stdin(Stdio::piped());
    let mut proc = Proc::spawn("ssh sha256sum", cmd);
    let mut stdin = proc.take_stdin();
    let up = thread::spawn(move || {
        let h = Payload::new(seed, len)
            .send(&mut stdin)
            .expect("write to ssh");
        stdin.flush().unwrap();
        h
    });
    let sent = up.join().unwrap();
    let st = proc.wait_exit();
    assert!(st.success(), "ssh sha256sum failed ({st})");
    let out = proc.stdout_text();
    assert_eq!(
        out.split_whitespace().next(),
        Some(hex(&sent).as_str()),
        "remote sha256sum differs"
    );
}
