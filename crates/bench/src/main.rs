//! `forward-bench`: measures every way of reaching a VM port the same way, in the same run,
//! next to a raw-TCP baseline and peer tools, and writes tables, JSON and plots.
//!
//! ```text
//!  workloads ──► path under test (raw | forward direct/agent | stunnel | socat | ssh)
//!      │              │  optional WAN relay on its middle hop (delay, bandwidth cap), or with
//!      │              │  --netem a packet-level link into a network namespace (delay, rate, loss)
//!      │              ▼
//!      │          backend on [::1] (sink | source | echo, chosen by the first byte)
//!      ▼
//!  report: Markdown + JSON + SVG plots in --out; live progress on the terminal
//! ```
//!
//! What it leaves to others: the tunnel itself (the `forward` binary, spawned as a child
//! process exactly as a user would run it), and the peers (installed tools, skipped if absent).

mod backend;
mod live;
mod netem;
mod paths;
mod peers;
mod plot;
mod process;
mod procstat;
mod report;
mod rlimit;
mod runner;
mod wan;
mod workload;

use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rand::Rng;

use crate::paths::{Env, PathKind};
use crate::report::Report;
use crate::runner::Settings;

#[derive(Parser, Debug)]
#[command(
    name = "forward-bench",
    version,
    about = "Benchmark forward against a raw-TCP baseline and peer tunnels"
)]
struct Args {
    /// Short run (under a minute): one round, short transfers, small scale test, one WAN profile.
    #[arg(long)]
    quick: bool,
    /// Comma-separated paths: raw, tls-client, direct, agent-tls, agent-tcp, quic, stunnel,
    /// socat, ssh. tls-client is the harness's own TLS straight to the edge: what direct mode
    /// and stunnel would measure if their relay cost nothing.
    #[arg(
        long,
        default_value = "raw,tls-client,direct,agent-tls,agent-tcp,quic,stunnel,socat,ssh"
    )]
    paths: String,
    /// Output directory for the report, JSON and plots.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// Rounds over all paths (default 3, 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per bulk transfer (default 2.5, 0.5 with --quick).
    #[arg(long)]
    bulk_secs: Option<f64>,
    /// Parallel streams for the ×N bulk workloads (16: the agent issue's target).
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Idle connections for the scale test (default 10000, 300 with --quick; 0 skips it).
    #[arg(long)]
    scale: Option<usize>,
    /// WAN profiles, comma-separated (wan20, wan50, wan100, wan100-1g, lossy50) or "none".
    #[arg(long)]
    wan: Option<String>,
    /// Packet-level WAN profiles, comma-separated (loss50, wan100, clean50, shallow50). Runs
    /// only this phase: the VM side in a network namespace behind an emulated link (delay,
    /// rate, queue, loss), the client side here; needs root, /dev/net/tun and iproute2. Paths:
    /// raw, direct, agent-tls, agent-tcp, quic, stunnel (others in --paths are skipped).
    #[arg(long, value_name = "PROFILES")]
    netem: Option<String>,
    /// Seconds of each --netem bulk download (default 6, 3 with --quick); idle round trips and
    /// round trips under load each run 3× that (for enough samples to read a p99), and a
    /// download beside a raw TCP one 2× that.
    #[arg(long, value_name = "SECS")]
    netem_secs: Option<f64>,
    /// Paths to run under the WAN profiles.
    #[arg(
        long,
        default_value = "raw,direct,agent-tls,agent-tcp,quic,stunnel,ssh"
    )]
    wan_paths: String,
    /// The forward binary (default: next to this one, else on PATH).
    #[arg(long)]
    forward_bin: Option<PathBuf>,
    /// Keep the scratch directory with every child's log (its path is printed). The children
    /// log at RUST_LOG=warn unless FORWARD_BENCH_LOG gives another filter (e.g.
    /// forward_mux=debug).
    #[arg(long)]
    keep_logs: bool,
    /// File name stem for the outputs (default: today's date, UTC).
    #[arg(long)]
    name: Option<String>,
    /// Internal: serve the backend on [IP]:P and [::1]:P inside a --netem namespace.
    #[arg(long, hide = true, value_name = "IP")]
    serve_backend: Option<std::net::Ipv6Addr>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(ip) = args.serve_backend {
        return serve_backend(ip);
    }
    let kinds = match paths::parse_list(&args.paths) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = match settings(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    block_on(
        tokio::runtime::Builder::new_multi_thread(),
        run(args, kinds, settings),
    )
}

/// The backend half of a `--netem` lab, run by the harness inside the namespace.
fn serve_backend(ip: std::net::Ipv6Addr) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2);
    block_on(builder, netem::serve_backend(ip))
}

/// Runs `fut` to completion on a runtime from `builder`; errors become one `error:` line.
fn block_on(
    mut builder: tokio::runtime::Builder,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn settings(args: &Args) -> anyhow::Result<Settings> {
    let q = args.quick;
    let wan_names = args.wan.clone().unwrap_or_else(|| {
        if q {
            "wan100".into()
        } else {
            "wan20,wan50,wan100,wan100-1g,lossy50".into()
        }
    });
    let mut wan_profiles = Vec::new();
    for name in wan_names
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "none")
    {
        match wan::profile(name) {
            Some(p) => wan_profiles.push(p),
            None => {
                let known: Vec<&str> = wan::PROFILES.iter().map(|p| p.name).collect();
                bail!(
                    "unknown WAN profile '{name}'; known: {}, or none",
                    known.join(", ")
                );
            }
        }
    }
    let mut wan_paths = paths::parse_list(&args.wan_paths).map_err(anyhow::Error::msg)?;
    if q && args.wan.is_none() {
        wan_paths.retain(|k| matches!(k, PathKind::Raw | PathKind::Direct | PathKind::AgentTls));
    }
    let bulk = args.bulk_secs.unwrap_or(if q { 0.5 } else { 2.5 });
    if !(bulk > 0.0 && bulk < 600.0) {
        bail!("--bulk-secs must be between 0 and 600");
    }
    if args.streams == 0 || args.streams > 256 {
        bail!("--streams must be between 1 and 256");
    }
    let mut netem_profiles = Vec::new();
    for name in args
        .netem
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match netem::netem_profile(name) {
            Some(p) => netem_profiles.push(p),
            None => {
                let known: Vec<&str> = netem::NETEM_PROFILES.iter().map(|p| p.name).collect();
                bail!(
                    "unknown --netem profile '{name}'; known: {}",
                    known.join(", ")
                );
            }
        }
    }
    if args.netem.is_some() && netem_profiles.is_empty() {
        bail!("--netem needs at least one profile, e.g. --netem loss50,wan100");
    }
    let netem_secs = args.netem_secs.unwrap_or(if q { 3.0 } else { 6.0 });
    if !(1.0..600.0).contains(&netem_secs) {
        bail!("--netem-secs must be between 1 and 600");
    }
    Ok(Settings {
        netem_profiles,
        netem_bulk: Duration::from_secs_f64(netem_secs),
        netem_rtt: Duration::from_secs_f64(netem_secs * 3.0),
        netem_warmup: Duration::from_secs_f64((netem_secs / 3.0).max(1.0)),
        netem_connects: if q { 10 } else { 30 },
        rounds: args.rounds.unwrap_or(if q { 1 } else { 3 }).max(1),
        bulk: Duration::from_secs_f64(bulk),
        streams: args.streams,
        rtt: Duration::from_millis(if q { 400 } else { 1500 }),
        connects: if q { 50 } else { 300 },
        connect_rate: Duration::from_millis(if q { 300 } else { 1000 }),
        connect_workers: 8,
        fairness: Duration::from_millis(if q { 400 } else { 1500 }),
        scale: if args.netem.is_some() {
            0
        } else {
            args.scale.unwrap_or(if q { 300 } else { 10_000 })
        },
        scale_time: Duration::from_secs(if q { 5 } else { 60 }),
        wan_profiles,
        wan_paths,
        wan_bulk: Duration::from_secs_f64(if q { 1.0 } else { 3.0 }),
        wan_rtt: Duration::from_millis(if q { 500 } else { 1500 }),
    })
}

async fn run(args: Args, kinds: Vec<PathKind>, mut settings: Settings) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output directory {}", args.out.display()))?;
    let mut notes = Vec::new();
    // Client sockets, backend sockets and the tunnel's own two per connection.
    let want = settings.scale as u64 * 4 + 4096;
    let soft = rlimit::raise_nofile(want);
    // The harness holds two descriptors per idle connection (client and backend side).
    let cap = (soft.saturating_sub(1000) / 2) as usize;
    if settings.scale > cap {
        notes.push(format!(
            "open-file limit is {soft} and could not be raised (no CAP_SYS_RESOURCE); the scale test \
             asks for {cap} connections instead of {}, and a tunnel process needing two or more \
             descriptors per connection hits the same limit first",
            settings.scale
        ));
        settings.scale = cap;
    }
    let tmp = std::env::temp_dir().join(format!("fbench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let token_file = tmp.join("token");
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::thread_rng().gen::<u8>()))
        .collect();
    write_private(&token_file, &token)?;
    let forward = match &args.forward_bin {
        Some(p) if p.is_file() => Some(p.clone()),
        Some(p) => bail!("--forward-bin {}: no such file", p.display()),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("forward")))
            .filter(|p| p.is_file())
            .or_else(|| process::which("forward")),
    };
    let edge = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("forward-edge")))
        .filter(|p| p.is_file())
        .or_else(|| process::which("forward-edge"))
        .map(|p| (p, Vec::new()))
        .or_else(|| forward.clone().map(|f| (f, vec!["edge".to_string()])));
    let backend = start_backend().await?;
    let env = Env {
        forward,
        edge,
        tmp: tmp.clone(),
        backend: backend.addr,
        token_file,
    };
    let mut report = Report {
        date: utc_date(),
        mode: if args.netem.is_some() {
            "netem"
        } else if args.quick {
            "quick"
        } else {
            "full"
        }
        .into(),
        rounds: settings.rounds,
        host: host_info(),
        settings: settings.describe(),
        notes,
        ..Default::default()
    };
    if let Some(f) = &env.forward {
        report
            .notes
            .push(format!("forward binary: {}", f.display()));
    }
    if let Some((e, a)) = &env.edge {
        report
            .notes
            .push(format!("edge: {} {}", e.display(), a.join(" ")));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    let (stop_tx, stop) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let why = tokio::select! {
            _ = tokio::signal::ctrl_c() => "interrupted (SIGINT)",
            _ = term.recv() => "terminated (SIGTERM)",
        };
        let _ = stop_tx.send(Some(why.to_string()));
    });
    // On a signal the step in progress is abandoned (its processes are killed on drop) and the
    // steps already finished are still written out.
    runner::run(&kinds, &env, &settings, &mut report, &stop).await;
    let stopped = stop.borrow().clone();
    if let Some(why) = &stopped {
        report.notes.insert(
            0,
            format!("**partial run**: {why} before the end; later steps are missing"),
        );
    }
    report.elapsed_secs = started.elapsed().as_secs_f64();
    let stem = args.name.clone().unwrap_or_else(|| report.date.clone());
    write_outputs(&report, &args.out, &stem)?;
    if args.keep_logs {
        println!("logs: {}", tmp.display());
    } else {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if let Some(why) = stopped {
        bail!(
            "{why}; partial results written to {}",
            args.out.join(format!("{stem}.md")).display()
        );
    }
    println!(
        "report: {} ({:.0} s)",
        args.out.join(format!("{stem}.md")).display(),
        report.elapsed_secs
    );
    Ok(())
}

/// The backend must own [::1]:P with 127.0.0.1:P free too, where the edge will listen.
async fn start_backend() -> anyhow::Result<backend::Backend> {
    let mut last = None;
    for _ in 0..20 {
        let port = process::free_port()?;
        match backend::Backend::start(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await {
            Ok(b) => return Ok(b),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no port")))
}

fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn write_outputs(report: &Report, out: &std::path::Path, stem: &str) -> anyhow::Result<()> {
    let mut md = report.to_markdown();
    if report.paths.is_empty() && report.wan.is_empty() {
        // A --netem run: its table is the result, there is nothing to plot.
        let md_path = out.join(format!("{stem}.md"));
        std::fs::write(&md_path, md)
            .with_context(|| format!("cannot write {}", md_path.display()))?;
        std::fs::write(
            out.join(format!("{stem}.json")),
            serde_json::to_string_pretty(report)?,
        )?;
        return Ok(());
    }
    let mut plots = vec![
        (format!("{stem}-throughput.svg"), "Throughput per path"),
        (format!("{stem}-rtt-cdf.svg"), "1-byte round trip CDF"),
        (
            format!("{stem}-connect-cdf.svg"),
            "connect + first byte CDF",
        ),
    ];
    if !report.wan.is_empty() {
        plots.push((format!("{stem}-wan.svg"), "Emulated WAN fill"));
        plot::wan_fill(report, &out.join(&plots[3].0))?;
    }
    plot::throughput(report, &out.join(&plots[0].0))?;
    plot::latency_cdf(
        report,
        "1-byte round trip, CDF per path",
        |p| &p.rtt_cdf,
        &out.join(&plots[1].0),
    )?;
    plot::latency_cdf(
        report,
        "connect + first byte, CDF per path",
        |p| &p.connect_cdf,
        &out.join(&plots[2].0),
    )?;
    md.push_str("\n## Plots\n\n");
    for (file, alt) in &plots {
        md.push_str(&format!("![{alt}]({file})\n\n"));
    }
    let md_path = out.join(format!("{stem}.md"));
    std::fs::write(&md_path, md).with_context(|| format!("cannot write {}", md_path.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(out.join(format!("{stem}.json")), json)?;
    Ok(())
}

fn utc_date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "undated".into())
}

fn host_info() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    // Other work on the machine skews every number; the load average at the start says how much.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    format!(
        "Linux {}, {n} × {cpu}, load average {load} at start",
        kernel.trim()
    )
}
