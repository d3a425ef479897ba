//! The run: rounds over the selected paths (interleaved, each round starting at a different
//! path), the scale test, the WAN profiles; results go into a [`Report`].

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::live::Live;
use crate::netem::{self, Lab, NetemProfile};
use crate::paths::{self, Env, PathKind, RunningPath};
use crate::procstat;
use crate::report::{
    self, NetemRow, PathReport, Percentiles, Report, Round, Scale, Sharing, WanRow,
};
use crate::wan::Profile;
use crate::workload::{self, Direction, Transfer};

pub struct Settings {
    pub rounds: usize,
    pub bulk: Duration,
    pub streams: usize,
    pub rtt: Duration,
    pub connects: u64,
    pub connect_rate: Duration,
    pub connect_workers: usize,
    pub fairness: Duration,
    pub scale: usize,
    pub scale_time: Duration,
    pub wan_profiles: Vec<&'static Profile>,
    pub wan_paths: Vec<PathKind>,
    pub wan_bulk: Duration,
    pub wan_rtt: Duration,
    /// `--netem`: when set, only the packet-level WAN phase runs.
    pub netem_profiles: Vec<&'static NetemProfile>,
    pub netem_bulk: Duration,
    /// How long the idle round trips run, and the round trips under a bulk download. One
    /// length for both: a p99 is only comparable between two sets of about as many samples.
    /// (Idle ran a quarter as long once, and its p99 at 1 % loss was the maximum of 79 samples:
    /// it caught a retransmission in some runs and not in others.)
    pub netem_rtt: Duration,
    /// How long the bulk download runs before the loaded round trips start.
    pub netem_warmup: Duration,
    /// Sequential connects + first byte over the link: a few round trips each, so a few
    /// seconds in all at 100 ms.
    pub netem_connects: u64,
}

impl Settings {
    pub fn describe(&self) -> String {
        if !self.netem_profiles.is_empty() {
            return format!(
                "packet-level WAN only: bulk download {:.1} s, idle round trips {rtt:.1} s, {} sequential \
                 connects + first byte, round trips under a bulk download {rtt:.1} s after {:.1} s of \
                 warm-up; a fresh namespace and link per path",
                self.netem_bulk.as_secs_f64(),
                self.netem_connects,
                self.netem_warmup.as_secs_f64(),
                rtt = self.netem_rtt.as_secs_f64(),
            );
        }
        format!(
            "bulk {:.1} s per transfer, N = {} streams, RTT {:.1} s, {} sequential connects + {:.1} s of connects with {} workers, \
             loaded RTT {:.1} s, scale {} connections",
            self.bulk.as_secs_f64(),
            self.streams,
            self.rtt.as_secs_f64(),
            self.connects,
            self.connect_rate.as_secs_f64(),
            self.connect_workers,
            self.fairness.as_secs_f64(),
            self.scale
        )
    }
}

/// Per path: the rounds so far and the merged histograms for the CDF plots.
struct Acc {
    rounds: Vec<Round>,
    rtt: Histogram<u64>,
    connect: Histogram<u64>,
    scale: Option<Scale>,
    peak_rss_kib: Option<u64>,
}

/// Runs `fut` with a generous time limit so one stuck path cannot hang the run.
async fn limited<T>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = anyhow::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit + Duration::from_secs(20), fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e:#}")),
        Err(_) => Err(format!("{what}: timed out")),
    }
}

/// Set to the reason when the run must stop early (a signal); the steps finished so far are kept.
pub type Stop = tokio::sync::watch::Receiver<Option<String>>;

/// Runs `fut` unless `stop` fires first.
async fn unless_stopped<T>(stop: &Stop, fut: impl Future<Output = T>) -> Option<T> {
    let mut stop = stop.clone();
    if stop.borrow().is_some() {
        return None;
    }
    tokio::select! {
        v = fut => Some(v),
        _ = stop.changed() => None,
    }
}

pub async fn run(kinds: &[PathKind], env: &Env, s: &Settings, report: &mut Report, stop: &Stop) {
    if !s.netem_profiles.is_empty() {
        run_netem(kinds, env, s, report, stop).await;
        return;
    }
    let wan_kinds: Vec<PathKind> = s
        .wan_paths
        .iter()
        .copied()
        .filter(|k| kinds.contains(k))
        .collect();
    let wan_runs: Vec<(&Profile, PathKind)> = s
        .wan_profiles
        .iter()
        .flat_map(|p| wan_kinds.iter().map(move |&k| (*p, k)))
        .filter(|(p, k)| !p.is_lossy() || k.is_udp())
        .collect();
    let steps = (s.rounds * kinds.len()
        + if s.scale > 0 {
            kinds.iter().filter(|&&k| holds_connections(k)).count()
        } else {
            0
        }
        + wan_runs.len()) as u64;
    let live = Live::new(steps);
    let tck = procstat::clk_tck() as f64;
    let mut skipped: Vec<PathKind> = Vec::new();
    for &k in kinds {
        if let Some(why) = paths::unavailable(k, env) {
            live.line(format!("skip {}: {why}", k.name()));
            report.skipped.push((k.name().into(), why));
            skipped.push(k);
        }
    }
    let mut acc: HashMap<PathKind, Acc> = HashMap::new();
    'rounds: for round in 0..s.rounds {
        for i in 0..kinds.len() {
            let kind = kinds[(i + round) % kinds.len()];
            if skipped.contains(&kind) {
                live.step_done();
                continue;
            }
            live.status(format!(
                "round {}/{} · {}: starting",
                round + 1,
                s.rounds,
                kind.name()
            ));
            let tag = format!("r{round}-{}", kind.name());
            let Some(started) = unless_stopped(stop, paths::start(kind, env, None, &tag)).await
            else {
                break 'rounds;
            };
            let mut path = match started {
                Ok(p) => p,
                Err(e) => {
                    let why = format!("failed to start: {e:#}");
                    live.line(format!("skip {}: {why}", kind.name()));
                    report.skipped.push((kind.name().into(), why));
                    skipped.push(kind);
                    live.step_done();
                    continue;
                }
            };
            let a = acc.entry(kind).or_insert_with(|| Acc {
                rounds: Vec::new(),
                rtt: workload::new_histogram(),
                connect: workload::new_histogram(),
                scale: None,
                peak_rss_kib: None,
            });
            let tag = format!("round {}/{} · {}", round + 1, s.rounds, kind.name());
            let Some(r) = unless_stopped(stop, measure(&mut path, s, &live, &tag, tck, a)).await
            else {
                break 'rounds;
            };
            live.line(summary_line(kind, round, &r));
            a.rounds.push(r);
            let hwm = path.sample().hwm_kib;
            if hwm > 0 {
                a.peak_rss_kib = Some(a.peak_rss_kib.unwrap_or(0).max(hwm));
            }
            if round + 1 == s.rounds && s.scale > 0 && holds_connections(kind) {
                live.status(format!("{}: scale", kind.name()));
                // Fresh processes: ones that just ran bulk transfers hold freed buffers that
                // new connections reuse, which made the "before" figure too high and the cost
                // per connection too low (QUIC came out negative in a quick run).
                path.shutdown().await;
                let tag = format!("scale-{}", kind.name());
                path = match unless_stopped(stop, paths::start(kind, env, None, &tag)).await {
                    None => break 'rounds,
                    Some(Ok(p)) => p,
                    Some(Err(e)) => {
                        live.line(format!(
                            "skip {} scale: failed to start: {e:#}",
                            kind.name()
                        ));
                        live.step_done();
                        live.step_done();
                        continue;
                    }
                };
                let Some(sc) = unless_stopped(stop, scale(&mut path, s, &live)).await else {
                    break 'rounds;
                };
                a.scale = Some(sc);
                if let Some(sc) = &a.scale {
                    live.line(format!(
                        "  {} scale: {} conns, {:.1} KiB/conn{}",
                        kind.name(),
                        sc.opened,
                        sc.per_conn_kib,
                        sc.note
                            .as_ref()
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default()
                    ));
                }
                live.step_done();
            }
            path.shutdown().await;
            live.step_done();
        }
    }
    for &(profile, kind) in &wan_runs {
        live.status(format!("{} · {}", profile.name, kind.name()));
        if !skipped.contains(&kind) {
            let Some(row) = unless_stopped(stop, wan_row(kind, profile, env, s)).await else {
                break;
            };
            live.line(format!(
                "{} {}: down {} Mbit/s (fill {}), RTT p50 {} ms{}",
                profile.name,
                kind.name(),
                row.down1_gbps
                    .map(|g| format!("{:.0}", g * 1000.0))
                    .unwrap_or("–".into()),
                row.fill
                    .map(|f| format!("{:.0} %", f * 100.0))
                    .unwrap_or("–".into()),
                row.rtt
                    .as_ref()
                    .map(|p| format!("{:.1}", p.p50_us / 1000.0))
                    .unwrap_or("–".into()),
                row.error
                    .as_ref()
                    .map(|e| format!(" [{e}]"))
                    .unwrap_or_default()
            ));
            report.wan.push(row);
        }
        live.step_done();
    }
    live.finish();
    for &kind in kinds {
        let Some(a) = acc.remove(&kind) else { continue };
        report.paths.push(PathReport {
            name: kind.name().into(),
            description: kind.describe().into(),
            peer: kind.is_peer(),
            median: report::summarize(&a.rounds),
            rounds: a.rounds,
            rtt_cdf: report::cdf(&a.rtt),
            connect_cdf: report::cdf(&a.connect),
            scale: a.scale,
            peak_rss_kib: a.peak_rss_kib,
        });
    }
}

fn summary_line(kind: PathKind, round: usize, r: &Round) -> String {
    let g = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or("–".into());
    let us = |p: &Option<Percentiles>| {
        p.as_ref()
            .map(|p| format!("{:.0}", p.p50_us))
            .unwrap_or("–".into())
    };
    let mut line = format!(
        "round {} {:<9} down {} up {} Gbit/s · RTT p50 {} µs · connect p50 {} µs",
        round + 1,
        kind.name(),
        g(r.down1_gbps),
        g(r.up1_gbps),
        us(&r.rtt),
        us(&r.connect)
    );
    for e in &r.errors {
        line.push_str(&format!("\n  error: {e}"));
    }
    line
}

/// One round of every workload on a running path.
async fn measure(
    path: &mut RunningPath,
    s: &Settings,
    live: &Live,
    tag: &str,
    tck: f64,
    acc: &mut Acc,
) -> Round {
    let target = path.target.clone();
    let addr = &target;
    let mut r = Round::default();
    let (all0, client0) = (path.sample(), procstat::sample(&path.client_pids()));
    let mut bits = 0.0;
    let bulks: [(Direction, usize, &str); 4] = [
        (Direction::Down, 1, "down ×1"),
        (Direction::Up, 1, "up ×1"),
        (Direction::Down, s.streams, "down ×N"),
        (Direction::Up, s.streams, "up ×N"),
    ];
    for (i, (dir, n, name)) in bulks.into_iter().enumerate() {
        live.status(format!("{tag}: bulk {name}"));
        match limited(name, s.bulk, workload::bulk(addr, dir, n, s.bulk)).await {
            Ok(t) => {
                bits += t.bytes as f64 * 8.0;
                let slot = match i {
                    0 => &mut r.down1_gbps,
                    1 => &mut r.up1_gbps,
                    2 => &mut r.down_n_gbps,
                    _ => &mut r.up_n_gbps,
                };
                *slot = Some(t.gbps());
            }
            Err(e) => r.errors.push(e),
        }
    }
    let (all1, client1) = (path.sample(), procstat::sample(&path.client_pids()));
    if bits > 0.0 && !path.procs.is_empty() {
        let per_gbit = |t0: u64, t1: u64| t1.saturating_sub(t0) as f64 / tck * 100.0 / (bits / 1e9);
        r.cpu_pct_per_gbps = Some(per_gbit(all0.ticks, all1.ticks));
        // The tls-client path's client is the harness itself, whose CPU is not the path's.
        r.client_cpu_pct_per_gbps =
            (!path.client_pids().is_empty()).then(|| per_gbit(client0.ticks, client1.ticks));
    }
    if let Err(e) = path.check_alive() {
        r.errors.push(format!("{e:#}"));
        return r;
    }
    live.status(format!("{tag}: 1-byte round trips"));
    match limited("ping-pong", s.rtt, workload::ping_pong(addr, s.rtt, 100)).await {
        Ok(h) => {
            r.rtt = Some(Percentiles::of(&h));
            let _ = acc.rtt.add(&h);
        }
        Err(e) => r.errors.push(e),
    }
    live.status(format!("{tag}: connect + first byte"));
    match limited(
        "connect",
        Duration::from_secs(30),
        workload::connect_latency(addr, s.connects),
    )
    .await
    {
        Ok(h) => {
            r.connect = Some(Percentiles::of(&h));
            let _ = acc.connect.add(&h);
        }
        Err(e) => r.errors.push(e),
    }
    match limited(
        "connect rate",
        s.connect_rate,
        workload::connect_rate(addr, s.connect_workers, s.connect_rate),
    )
    .await
    {
        Ok(rate) => r.conns_per_sec = Some(rate),
        Err(e) => r.errors.push(e),
    }
    live.status(format!("{tag}: round trips under bulk load"));
    match limited(
        "loaded ping-pong",
        s.fairness,
        workload::fairness(addr, s.fairness),
    )
    .await
    {
        Ok((h, t)) => {
            r.loaded_rtt = Some(Percentiles::of(&h));
            r.loaded_bulk_gbps = Some(t.gbps());
        }
        Err(e) => r.errors.push(e),
    }
    r
}

/// Whether the scale test applies: the connections' memory is in the path's processes. For
/// `tls-client` it would be in the harness.
fn holds_connections(kind: PathKind) -> bool {
    kind != PathKind::TlsClient
}

async fn scale(path: &mut RunningPath, s: &Settings, live: &Live) -> Scale {
    let mut n = s.scale;
    let mut note = None;
    if path.kind == PathKind::Socat && n > 1000 {
        n = 1000;
        note = Some(
            "socat forks a process per connection: capped at 1000, and summed RSS counts each \
             process's shared pages again"
                .to_string(),
        );
    }
    // Let memory freed by the earlier workloads settle before the baseline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (all0, client0) = (path.sample(), procstat::sample(&path.client_pids()));
    let bar = live.counter(n as u64, format!("{}: idle connections", path.kind.name()));
    let deadline = Instant::now() + s.scale_time;
    let (held, err) =
        workload::hold_idle(&path.target, n, deadline, &|k| bar.set_position(k as u64)).await;
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (all1, client1) = (path.sample(), procstat::sample(&path.client_pids()));
    let opened = held.len();
    drop(held);
    if let Some(e) = err {
        note = Some(match note {
            Some(n) => format!("{n}; {e}"),
            None => e,
        });
    }
    let per = |a: u64, b: u64| {
        if opened == 0 {
            0.0
        } else {
            (b as f64 - a as f64) / opened as f64
        }
    };
    Scale {
        requested: n,
        opened,
        rss_before_kib: all0.rss_kib,
        rss_after_kib: all1.rss_kib,
        per_conn_kib: per(all0.rss_kib, all1.rss_kib),
        client_per_conn_kib: per(client0.rss_kib, client1.rss_kib),
        pss_per_conn_kib: per(all0.pss_kib, all1.pss_kib),
        note,
    }
}

async fn wan_row(kind: PathKind, profile: &Profile, env: &Env, s: &Settings) -> WanRow {
    let mut row = WanRow {
        profile: profile.name.into(),
        rtt_ms: profile.rtt_ms,
        mbit: profile.mbit,
        path: kind.name().into(),
        ..Default::default()
    };
    let path = match paths::start(
        kind,
        env,
        Some(profile),
        &format!("{}-{}", profile.name, kind.name()),
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            row.error = Some(format!("failed to start: {e:#}"));
            return row;
        }
    };
    let target = path.target.clone();
    let addr = &target;
    let mut errors = Vec::new();
    let t: Result<Transfer, String> = limited(
        "down ×1",
        s.wan_bulk,
        workload::bulk(addr, Direction::Down, 1, s.wan_bulk),
    )
    .await;
    match t {
        Ok(t) => {
            row.down1_gbps = Some(t.gbps());
            row.fill = profile.mbit.map(|m| t.gbps() * 1000.0 / m as f64);
        }
        Err(e) => errors.push(e),
    }
    match limited(
        "up ×1",
        s.wan_bulk,
        workload::bulk(addr, Direction::Up, 1, s.wan_bulk),
    )
    .await
    {
        Ok(t) => row.up1_gbps = Some(t.gbps()),
        Err(e) => errors.push(e),
    }
    match limited(
        "ping-pong",
        s.wan_rtt,
        workload::ping_pong(addr, s.wan_rtt, 5),
    )
    .await
    {
        Ok(h) => row.rtt = Some(Percentiles::of(&h)),
        Err(e) => errors.push(e),
    }
    if !errors.is_empty() {
        row.error = Some(errors.join("; "));
    }
    path.shutdown().await;
    row
}

/// The `--netem` phase: every profile × path on a fresh lab (namespace, link, backend), so
/// no TCP state or queue is carried from one path to the next.
async fn run_netem(kinds: &[PathKind], env: &Env, s: &Settings, report: &mut Report, stop: &Stop) {
    let mut lab_kinds = Vec::new();
    for &k in kinds {
        if !paths::runs_in_lab(k) {
            report.skipped.push((
                k.name().into(),
                "not run under --netem (only forward's paths, stunnel and raw)".into(),
            ));
        } else if let Some(why) = paths::unavailable(k, env) {
            report.skipped.push((k.name().into(), why));
        } else {
            lab_kinds.push(k);
        }
    }
    let live = Live::new((s.netem_profiles.len() * lab_kinds.len()) as u64);
    if let Err(why) = netem::preflight() {
        live.line(format!("netem: cannot build the emulated link: {why}"));
        report.notes.push(format!("--netem could not run: {why}"));
        live.finish();
        return;
    }
    let cc = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    report.notes.push(format!(
        "kernel TCP congestion control (both namespaces inherit it): {cc}"
    ));
    'all: for profile in &s.netem_profiles {
        for &kind in &lab_kinds {
            live.status(format!("{} · {}: starting", profile.name, kind.name()));
            let Some(row) =
                unless_stopped(stop, netem_row(kind, profile, env, s, &cc, &live)).await
            else {
                break 'all;
            };
            let ms = |p: &Option<Percentiles>| {
                p.as_ref()
                    .map(|p| format!("{:.1}/{:.1}", p.p50_us / 1000.0, p.p99_us / 1000.0))
                    .unwrap_or("–".into())
            };
            live.line(format!(
                "{} {:<9}: down {} Mbit/s (fill {}) · idle RTT p50/p99 {} ms · connect {} ms · loaded {} ms{}",
                profile.name,
                kind.name(),
                row.down_mbps
                    .map(|m| format!("{m:.1}"))
                    .unwrap_or("–".into()),
                row.fill
                    .map(|f| format!("{:.0} %", f * 100.0))
                    .unwrap_or("–".into()),
                ms(&row.idle_rtt),
                ms(&row.connect),
                ms(&row.loaded_rtt),
                row.error
                    .as_ref()
                    .map(|e| format!(" [{e}]"))
                    .unwrap_or_default()
            ));
            report.netem.push(row);
            live.step_done();
        }
    }
    live.finish();
}

async fn netem_row(
    kind: PathKind,
    profile: &NetemProfile,
    env: &Env,
    s: &Settings,
    cc: &str,
    live: &Live,
) -> NetemRow {
    let params = profile.link_params();
    let mut row = NetemRow {
        profile: profile.name.into(),
        rtt_ms: profile.rtt_ms,
        mbit: profile.mbit,
        loss_pct: profile.loss * 100.0,
        queue_bytes: params.queue_bytes,
        path: kind.name().into(),
        ..Default::default()
    };
    let tag = format!("{}-{}", profile.name, kind.name());
    let lab = match Lab::start(params).await {
        Ok(l) => l,
        Err(e) => {
            row.error = Some(format!("cannot build the lab: {e:#}"));
            return row;
        }
    };
    let started = async {
        let exe = std::env::current_exe().map_err(|e| anyhow::anyhow!("own path: {e}"))?;
        let (backend, addr, cubic_addr) = lab
            .start_backend(&exe, env.tmp.join(format!("{tag}-backend.log")))
            .await?;
        let lab_env = Env {
            forward: env.forward.clone(),
            edge: env.edge.clone(),
            tmp: env.tmp.clone(),
            backend: addr,
            token_file: env.token_file.clone(),
        };
        let path = paths::start_in_lab(kind, &lab_env, &lab, &tag).await?;
        anyhow::Ok((backend, addr, cubic_addr, path))
    }
    .await;
    let (backend, backend_addr, cubic_addr, mut path) = match started {
        Ok(v) => v,
        Err(e) => {
            row.error = Some(format!("failed to start: {e:#}"));
            lab.shutdown().await;
            return row;
        }
    };
    let target = path.target.clone();
    let addr = &target;
    let mut errors = Vec::new();
    let tag = format!("{} · {}", profile.name, kind.name());
    live.status(format!("{tag}: bulk download"));
    match limited(
        "down ×1",
        s.netem_bulk,
        workload::download_settled(addr, s.netem_bulk, s.netem_bulk / 3),
    )
    .await
    {
        Ok((all, settled)) => {
            row.down_mbps = Some(all.gbps() * 1000.0);
            row.fill = Some(all.gbps() * 1000.0 / profile.mbit as f64);
            row.settled_down_mbps = Some(settled.gbps() * 1000.0);
            row.settled_fill = Some(settled.gbps() * 1000.0 / profile.mbit as f64);
        }
        Err(e) => errors.push(e),
    }
    live.status(format!("{tag}: idle round trips"));
    match limited(
        "ping-pong",
        s.netem_rtt,
        workload::ping_pong(addr, s.netem_rtt, 20),
    )
    .await
    {
        Ok(h) => row.idle_rtt = Some(Percentiles::of(&h)),
        Err(e) => errors.push(e),
    }
    live.status(format!("{tag}: connect + first byte"));
    // A TCP handshake is one round trip and a TLS 1.3 one another: this shows in round trips
    // what each path pays before its first byte. The limit leaves room for a lost SYN (1 s).
    match limited(
        "connect",
        Duration::from_secs(20),
        workload::connect_latency(addr, s.netem_connects),
    )
    .await
    {
        Ok(h) => row.connect = Some(Percentiles::of(&h)),
        Err(e) => errors.push(e),
    }
    live.status(format!("{tag}: round trips under a bulk download"));
    match limited(
        "loaded ping-pong",
        s.netem_warmup + s.netem_rtt,
        workload::fairness_after(addr, s.netem_warmup, s.netem_rtt),
    )
    .await
    {
        Ok((h, t)) => {
            row.loaded_rtt = Some(Percentiles::of(&h));
            row.loaded_down_mbps = Some(t.gbps() * 1000.0);
        }
        Err(e) => errors.push(e),
    }
    // The link's counters describe the path alone: the shared runs below add another flow.
    let [up, down] = lab.stats();
    row.link_up = Some(up);
    row.link_down = Some(down);
    // Twice the bulk time: two congestion controls take seconds to settle on their shares.
    let shared = s.netem_bulk * 2;
    let mut competitors = vec![(cc.to_string(), backend_addr)];
    if cc != "cubic" {
        competitors.push(("cubic".to_string(), cubic_addr));
    }
    for (competitor, source) in competitors {
        live.status(format!("{tag}: beside a raw TCP download ({competitor})"));
        let source = workload::Target::from(source);
        let (through, beside) = tokio::join!(
            limited(
                "shared down",
                shared,
                workload::download_settled(addr, shared, shared / 3)
            ),
            limited(
                "raw beside",
                shared,
                workload::download_settled(&source, shared, shared / 3)
            ),
        );
        match (through, beside) {
            (Ok((_, mine)), Ok((_, raw))) => row.sharing.push(Sharing {
                competitor,
                path_mbps: mine.gbps() * 1000.0,
                competitor_mbps: raw.gbps() * 1000.0,
            }),
            (Err(e), _) | (_, Err(e)) => errors.push(e),
        }
    }
    if let Err(e) = path.check_alive() {
        errors.push(format!("{e:#}"));
    }
    if !errors.is_empty() {
        row.error = Some(errors.join("; "));
    }
    path.shutdown().await;
    backend.kill().await;
    lab.shutdown().await;
    row
}
