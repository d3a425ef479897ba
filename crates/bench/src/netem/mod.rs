//! Packet-level WAN emulation (this kernel has no qdiscs, so no tc netem): a user-space link
//! between two TUN devices, one in the root network namespace and one in a namespace made for
//! the run. Everything the VM side runs (edge, agent, backend) runs inside that namespace, the
//! client side (forward, the measuring client) outside, so every packet between them crosses
//! the emulated link and the kernels' own TCP stacks see the delay, the rate and the loss.
//!
//! ```text
//!   root namespace                      this process                   namespace fwdbench-PID-N
//!   client ─► fd66:P:N::1 ─ tun A ─► [Pipe up:   loss, queue, rate, delay] ─► tun B ─ fd66:P:N::2 (VM: agent, backend)
//!                             ◄──── [Pipe down: loss, queue, rate, delay] ◄────── fd66:P:N::3 (edge)
//! ```
//!
//! The scheduling is [`pipe::Pipe`], sans-IO; this module only moves packets between the
//! devices and the pipes. One process owns both devices: a TUN device stays usable through
//! its descriptor after `ip link set DEV netns NS`.
//!
//! Only ULA addresses from fd66::/16 are put on the devices and only their /64 is routed
//! there. The devices vanish with this process (they are not persistent); the namespace is
//! deleted on drop, and namespaces left by a run that died are deleted (with their processes)
//! when the next lab starts.

pub mod pipe;

use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::task::JoinHandle;
use tokio_tun::Tun;

use crate::process::{self, wait_line, Proc, Side};
use pipe::{LinkParams, Pipe, PipeStats};

/// Every namespace this harness creates starts with this, followed by `PID-N`.
const NS_PREFIX: &str = "fwdbench-";

/// A named emulated path: round-trip time, bottleneck rate and random loss (each way).
#[derive(Clone, Debug, serde::Serialize)]
pub struct NetemProfile {
    pub name: &'static str,
    pub rtt_ms: u64,
    pub mbit: u64,
    /// Probability of losing a packet, in each direction independently.
    pub loss: f64,
    /// The bottleneck queue holds one bandwidth-delay product divided by this.
    pub queue_divisor: u64,
}

pub const NETEM_PROFILES: &[NetemProfile] = &[
    // Issue #5: "at 50 ms RTT with 1 % loss, interactive p99 under bulk lower over QUIC".
    NetemProfile {
        name: "loss50",
        rtt_ms: 50,
        mbit: 100,
        loss: 0.01,
        queue_divisor: 1,
    },
    // Issue #5: "bulk throughput at 100 ms RTT reaches the emulated bandwidth".
    NetemProfile {
        name: "wan100",
        rtt_ms: 100,
        mbit: 100,
        loss: 0.0,
        queue_divisor: 1,
    },
    // loss50 without the loss: what the loss alone costs.
    NetemProfile {
        name: "clean50",
        rtt_ms: 50,
        mbit: 100,
        loss: 0.0,
        queue_divisor: 1,
    },
    // clean50 behind a shallow queue (an eighth of a BDP, 6 ms): overflow shows as loss long
    // before it shows in the round trip. What QUIC's loss judge (which answers a loss without
    // a visible queue only past 4 %) costs in packets dropped.
    NetemProfile {
        name: "shallow50",
        rtt_ms: 50,
        mbit: 100,
        loss: 0.0,
        queue_divisor: 8,
    },
];

pub fn netem_profile(name: &str) -> Option<&'static NetemProfile> {
    NETEM_PROFILES.iter().find(|p| p.name == name)
}

impl NetemProfile {
    pub fn bytes_per_sec(&self) -> f64 {
        self.mbit as f64 * 1e6 / 8.0
    }

    /// The queue in front of the bottleneck: one bandwidth-delay product (at least 64 KiB),
    /// unless the profile divides it. One BDP is the classic buffer that lets one loss-based
    /// TCP flow keep the link busy through a window reduction, and it also means a sender that
    /// fills it doubles the round trip, which is the bufferbloat an interactive stream sees
    /// behind a bulk one.
    pub fn queue_bytes(&self) -> usize {
        let bdp = self.bytes_per_sec() * self.rtt_ms as f64 / 1000.0;
        (bdp as usize / self.queue_divisor.max(1) as usize).max(64 * 1024)
    }

    pub fn link_params(&self) -> LinkParams {
        LinkParams {
            one_way: Duration::from_micros(self.rtt_ms * 500),
            bytes_per_sec: Some(self.bytes_per_sec()),
            loss: self.loss,
            queue_bytes: self.queue_bytes(),
        }
    }
}

/// Runs `ip ARGS`; the error carries ip's own message.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("cannot run `ip {}` (install iproute2)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Why labs cannot be built here, if they cannot: no TUN device, no `ip`, or no right to
/// create a network namespace. Checked before anything is measured.
pub fn preflight() -> Result<(), String> {
    if !Path::new("/dev/net/tun").exists() {
        return Err(
            "/dev/net/tun does not exist (no TUN support in this kernel or container)".into(),
        );
    }
    if process::which("ip").is_none() {
        return Err("`ip` not found (apt-get install iproute2)".into());
    }
    let probe = format!(
        "{NS_PREFIX}{}-probe{}",
        std::process::id(),
        LAB_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    ip(&["netns", "add", &probe])
        .map_err(|e| format!("cannot create a network namespace (needs root): {e:#}"))?;
    let _ = ip(&["netns", "del", &probe]);
    Ok(())
}

/// Deletes namespaces of harness runs whose process is gone, killing what still runs in them.
pub fn clean_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for line in ip_output(&["netns", "list"]).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_all_in(name);
        if ip(&["netns", "del", name]).is_ok() {
            removed.push(name.to_string());
        }
    }
    removed
}

fn kill_all_in(ns: &str) {
    let pids: Vec<String> = ip_output(&["netns", "pids", ns])
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if !pids.is_empty() {
        let _ = Command::new("kill").arg("-KILL").args(&pids).output();
    }
}

/// A named network namespace, deleted (with whatever still runs in it) when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    fn create(name: String) -> anyhow::Result<Netns> {
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Both directions of the link: the tasks moving packets and their counters.
struct Link {
    tasks: Vec<JoinHandle<()>>,
    /// Client → VM, VM → client.
    stats: [Arc<Mutex<PipeStats>>; 2],
}

impl Link {
    fn start(outer: Tun, inner: Tun, params: LinkParams) -> Link {
        let (outer, inner) = (Arc::new(outer), Arc::new(inner));
        let stats = [
            Arc::new(Mutex::new(PipeStats::default())),
            Arc::new(Mutex::new(PipeStats::default())),
        ];
        let tasks = vec![
            tokio::spawn(carry(
                outer.clone(),
                inner.clone(),
                params.clone(),
                stats[0].clone(),
            )),
            tokio::spawn(carry(inner, outer, params, stats[1].clone())),
        ];
        Link { tasks, stats }
    }

    fn stats(&self) -> [PipeStats; 2] {
        let get = |s: &Arc<Mutex<PipeStats>>| s.lock().map(|s| *s).unwrap_or_default();
        [get(&self.stats[0]), get(&self.stats[1])]
    }

    /// Stops both directions and waits until the devices are closed.
    async fn stop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Packets read from one device at a time before the due ones are written out: enough to
/// amortise the wake-ups, few enough that a flood cannot delay deliveries noticeably.
const READ_BATCH: usize = 64;

/// Tokio's timers fire on a millisecond tick after their deadline (and the reactor's wait
/// rounds up again), so a packet woken at its due time left about 1.3 ms late: a 50 ms
/// profile measured 52.6 ms. Waking a millisecond early and sending what is due within that
/// millisecond brings it to 50.4 ms; a packet may leave up to a millisecond early, never out
/// of order.
const SLACK: Duration = Duration::from_micros(1000);

/// One direction: device `from` → pipe → device `to`.
async fn carry(from: Arc<Tun>, to: Arc<Tun>, params: LinkParams, stats: Arc<Mutex<PipeStats>>) {
    let mut pipe = Pipe::new(params, StdRng::from_entropy());
    let mut buf = vec![0u8; 65536];
    loop {
        let now = Instant::now();
        while let Some(packet) = pipe.pop_due(now + SLACK) {
            // Writing to a device that is down (not yet configured, or being torn down) fails;
            // that packet is lost, as it would be on a real link.
            let _ = to.send(&packet).await;
        }
        if let Ok(mut s) = stats.lock() {
            *s = pipe.stats();
        }
        let next = pipe.next_due();
        tokio::select! {
            r = from.recv(&mut buf) => {
                match r {
                    Ok(n) => {
                        pipe.push(Instant::now(), buf[..n].to_vec());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "netem: reading the TUN device failed; link stopped");
                        return;
                    }
                }
                for _ in 1..READ_BATCH {
                    match from.try_recv(&mut buf) {
                        Ok(n) => {
                            pipe.push(Instant::now(), buf[..n].to_vec());
                        }
                        Err(_) => break,
                    }
                }
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(
                next.map_or(now, |due| due.checked_sub(SLACK).unwrap_or(due)),
            )), if next.is_some() => {}
        }
    }
}

/// Distinguishes the labs of one process (tests build several at once).
static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// A namespace joined to the root namespace by an emulated link.
pub struct Lab {
    /// Dropped after the link (field order): the namespace outlives the devices' tasks.
    link: Link,
    pub ns: Netns,
    /// The VM inside the namespace: backend, agent.
    pub vm_ip: Ipv6Addr,
    /// The edge inside the namespace (a second address, so it can use the VM's ports).
    pub edge_ip: Ipv6Addr,
}

impl Lab {
    /// Creates the namespace, the two devices and the link between them. Must run inside a
    /// tokio runtime (the devices register with its reactor).
    pub async fn start(params: LinkParams) -> anyhow::Result<Lab> {
        for gone in clean_stale() {
            tracing::info!(namespace = %gone, "netem: removed a stale namespace");
        }
        let pid = std::process::id();
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let ns = Netns::create(format!("{NS_PREFIX}{pid}-{seq}"))?;
        // Interface names have at most 15 bytes.
        let (outer_name, inner_name) =
            (format!("fb{pid:x}x{seq:x}a"), format!("fb{pid:x}x{seq:x}b"));
        let make = |name: &str| -> anyhow::Result<Tun> {
            Tun::builder()
                .name(name)
                .mtu(1500)
                .build()
                .map_err(|e| anyhow!("cannot create TUN device {name}: {e}"))?
                .pop()
                .ok_or_else(|| anyhow!("no TUN device {name} returned"))
        };
        let outer = make(&outer_name)?;
        let inner = make(&inner_name)?;
        let prefix = [0xfd66, (pid & 0xffff) as u16, (seq & 0xffff) as u16, 0];
        let addr =
            |host: u16| Ipv6Addr::new(prefix[0], prefix[1], prefix[2], prefix[3], 0, 0, 0, host);
        let (client_ip, vm_ip, edge_ip) = (addr(1), addr(2), addr(3));
        ip(&["link", "set", &inner_name, "netns", &ns.name])?;
        // nodad: duplicate address detection would keep the addresses unusable for a second.
        ip(&[
            "addr",
            "add",
            &format!("{client_ip}/64"),
            "dev",
            &outer_name,
            "nodad",
        ])?;
        ip(&["link", "set", &outer_name, "up"])?;
        for a in [vm_ip, edge_ip] {
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{a}/64"),
                "dev",
                &inner_name,
                "nodad",
            ])?;
        }
        ip(&["-n", &ns.name, "link", "set", &inner_name, "up"])?;
        let link = Link::start(outer, inner, params);
        Ok(Lab {
            link,
            ns,
            vm_ip,
            edge_ip,
        })
    }

    /// The command line that runs `program args` inside the namespace (`ip netns exec`
    /// replaces itself with the program, so the pid is the program's).
    pub fn wrap(&self, program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
        let mut all = vec![
            "netns".to_string(),
            "exec".into(),
            self.ns.name.clone(),
            program.display().to_string(),
        ];
        all.extend(args.iter().cloned());
        (PathBuf::from("ip"), all)
    }

    /// Counters of both directions: client → VM, VM → client.
    pub fn stats(&self) -> [PipeStats; 2] {
        self.link.stats()
    }

    /// Starts `program --serve-backend VM_IP` in the namespace (this harness's hidden backend
    /// mode) and returns the process, the backend's address on the VM, and that of its twin
    /// whose sockets send with TCP Cubic (`Backend::start_cubic`).
    pub async fn start_backend(
        &self,
        program: &Path,
        log: PathBuf,
    ) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
        let (bin, args) = self.wrap(
            program,
            &["--serve-backend".to_string(), self.vm_ip.to_string()],
        );
        let (mut proc, lines) = Proc::spawn("backend", Side::Server, &bin, &args, log)?;
        let (port, cubic) = wait_line(&mut proc, lines, Duration::from_secs(15), |l| {
            let (port, cubic) = l.strip_prefix("backend port ")?.split_once(" cubic ")?;
            Some((
                port.trim().parse::<u16>().ok()?,
                cubic.trim().parse::<u16>().ok()?,
            ))
        })
        .await?;
        Ok((
            proc,
            SocketAddr::from((self.vm_ip, port)),
            SocketAddr::from((self.vm_ip, cubic)),
        ))
    }

    /// Stops the link and deletes the namespace.
    pub async fn shutdown(mut self) {
        self.link.stop().await;
    }
}

/// The hidden `--serve-backend IP` mode: the backend on `[IP]:P` and `[::1]:P` (P picked by
/// the system) and its Cubic twin on `[IP]:Q`, `backend port P cubic Q` on stdout, then serve
/// until killed.
pub async fn serve_backend(ip: Ipv6Addr) -> anyhow::Result<()> {
    let first = crate::backend::Backend::start(SocketAddr::from((ip, 0))).await?;
    let port = first.addr.port();
    let _local =
        crate::backend::Backend::start(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await?;
    let cubic = crate::backend::Backend::start_cubic(SocketAddr::from((ip, 0))).await?;
    println!("backend port {port} cubic {}", cubic.addr.port());
    std::future::pending::<()>().await;
    Ok(())
}

#[cfg(test)]
mod tests;
