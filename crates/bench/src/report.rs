//! What a run measured (serialised as JSON) and its Markdown rendering: medians over rounds,
//! ratios to the raw baseline and to the best peer, and the targets the issues set.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub samples: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            samples: h.len(),
        }
    }
}

/// One path, one round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Round {
    pub down1_gbps: Option<f64>,
    pub up1_gbps: Option<f64>,
    pub down_n_gbps: Option<f64>,
    pub up_n_gbps: Option<f64>,
    /// CPU of all the path's processes during the bulk workloads, % of one core per Gbit/s.
    pub cpu_pct_per_gbps: Option<f64>,
    /// The same for the client-side processes only (what runs on the user's machine).
    pub client_cpu_pct_per_gbps: Option<f64>,
    pub rtt: Option<Percentiles>,
    pub connect: Option<Percentiles>,
    pub conns_per_sec: Option<f64>,
    /// Round trips while one bulk download runs on the same path.
    pub loaded_rtt: Option<Percentiles>,
    pub loaded_bulk_gbps: Option<f64>,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Scale {
    pub requested: usize,
    pub opened: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub per_conn_kib: f64,
    pub client_per_conn_kib: f64,
    /// The same from the proportional set size (fair to forking peers).
    pub pss_per_conn_kib: f64,
    pub note: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PathReport {
    pub name: String,
    pub description: String,
    pub peer: bool,
    pub rounds: Vec<Round>,
    /// Medians over rounds, field by field (percentiles included).
    pub median: Round,
    /// Round-trip CDF over all rounds: (latency µs, percentile).
    pub rtt_cdf: Vec<(f64, f64)>,
    pub connect_cdf: Vec<(f64, f64)>,
    pub scale: Option<Scale>,
    /// Highest summed VmHWM of the path's processes after the workloads (before the scale test).
    pub peak_rss_kib: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct WanRow {
    pub profile: String,
    pub rtt_ms: u64,
    pub mbit: Option<u64>,
    pub path: String,
    pub down1_gbps: Option<f64>,
    pub up1_gbps: Option<f64>,
    /// Achieved download / emulated bandwidth.
    pub fill: Option<f64>,
    pub rtt: Option<Percentiles>,
    pub error: Option<String>,
}

/// One path over the packet-level emulated link (`--netem`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct NetemRow {
    pub profile: String,
    pub rtt_ms: u64,
    pub mbit: u64,
    /// Loss probability in each direction, in %.
    pub loss_pct: f64,
    /// Drop-tail queue in front of the bottleneck, per direction.
    pub queue_bytes: usize,
    pub path: String,
    /// One bulk download alone.
    pub down_mbps: Option<f64>,
    /// `down_mbps` / emulated bandwidth.
    pub fill: Option<f64>,
    /// The same download from a third of its time on: the rate after the sender's ramp-up.
    pub settled_down_mbps: Option<f64>,
    pub settled_fill: Option<f64>,
    /// 1-byte round trips on an otherwise idle path.
    pub idle_rtt: Option<Percentiles>,
    /// 1-byte round trips while one bulk download runs on the same path (for the agent paths
    /// both connections are streams of the one carrier).
    pub loaded_rtt: Option<Percentiles>,
    pub loaded_down_mbps: Option<f64>,
    /// Sequential connect + first byte (echoed) through the path, on an otherwise idle link.
    pub connect: Option<Percentiles>,
    /// One download through the path beside one raw TCP download straight from the backend,
    /// once per competitor congestion control: how the path shares a bottleneck with an
    /// ordinary flow.
    pub sharing: Vec<Sharing>,
    /// The link's counters, client → VM and VM → client, over the path's own workloads (up to
    /// the run beside a raw download).
    pub link_up: Option<crate::netem::pipe::PipeStats>,
    pub link_down: Option<crate::netem::pipe::PipeStats>,
    pub error: Option<String>,
}

/// A download through a path and a raw TCP download at the same time over the link: their
/// settled rates (from a third of the time on).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sharing {
    /// The raw flow's congestion control (the backend's sender).
    pub competitor: String,
    pub path_mbps: f64,
    pub competitor_mbps: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub date: String,
    pub mode: String,
    pub rounds: usize,
    pub host: String,
    pub settings: String,
    pub paths: Vec<PathReport>,
    pub wan: Vec<WanRow>,
    pub netem: Vec<NetemRow>,
    pub skipped: Vec<(String, String)>,
    pub notes: Vec<String>,
    pub elapsed_secs: f64,
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn median_of(rounds: &[Round], f: impl Fn(&Round) -> Option<f64>) -> Option<f64> {
    median(rounds.iter().filter_map(f).collect())
}

fn median_pct(rounds: &[Round], f: impl Fn(&Round) -> Option<&Percentiles>) -> Option<Percentiles> {
    let ps: Vec<&Percentiles> = rounds.iter().filter_map(f).collect();
    if ps.is_empty() {
        return None;
    }
    let m = |g: fn(&Percentiles) -> f64| median(ps.iter().map(|p| g(p)).collect()).unwrap_or(0.0);
    Some(Percentiles {
        p50_us: m(|p| p.p50_us),
        p90_us: m(|p| p.p90_us),
        p99_us: m(|p| p.p99_us),
        p999_us: m(|p| p.p999_us),
        max_us: m(|p| p.max_us),
        samples: ps.iter().map(|p| p.samples).sum(),
    })
}

/// Field-by-field medians over rounds.
pub fn summarize(rounds: &[Round]) -> Round {
    Round {
        down1_gbps: median_of(rounds, |r| r.down1_gbps),
        up1_gbps: median_of(rounds, |r| r.up1_gbps),
        down_n_gbps: median_of(rounds, |r| r.down_n_gbps),
        up_n_gbps: median_of(rounds, |r| r.up_n_gbps),
        cpu_pct_per_gbps: median_of(rounds, |r| r.cpu_pct_per_gbps),
        client_cpu_pct_per_gbps: median_of(rounds, |r| r.client_cpu_pct_per_gbps),
        rtt: median_pct(rounds, |r| r.rtt.as_ref()),
        connect: median_pct(rounds, |r| r.connect.as_ref()),
        conns_per_sec: median_of(rounds, |r| r.conns_per_sec),
        loaded_rtt: median_pct(rounds, |r| r.loaded_rtt.as_ref()),
        loaded_bulk_gbps: median_of(rounds, |r| r.loaded_bulk_gbps),
        errors: Vec::new(),
    }
}

/// (latency µs, percentile) points of a histogram, dense in the tail.
pub fn cdf(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut qs: Vec<f64> = (0..=98).map(|i| i as f64 / 100.0).collect();
    qs.extend([0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0]);
    qs.iter()
        .map(|&q| (h.value_at_quantile(q) as f64 / 1000.0, q * 100.0))
        .collect()
}

fn f(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) => format!("{x:.digits$}"),
        None => "–".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn ratio_txt(a: Option<f64>, b: Option<f64>) -> String {
    match ratio(a, b) {
        Some(r) => format!("{r:.2}×"),
        None => "–".into(),
    }
}

impl Report {
    pub fn path(&self, name: &str) -> Option<&PathReport> {
        self.paths.iter().find(|p| p.name == name)
    }

    /// The best peer by a metric: the highest value, or the lowest if `lower_is_better`.
    fn best_peer(
        &self,
        metric: impl Fn(&Round) -> Option<f64>,
        lower_is_better: bool,
    ) -> Option<(String, f64)> {
        self.paths
            .iter()
            .filter(|p| p.peer)
            .filter_map(|p| metric(&p.median).map(|v| (p.name.clone(), v)))
            .reduce(|a, b| {
                let b_better = if lower_is_better {
                    b.1 < a.1
                } else {
                    b.1 > a.1
                };
                if b_better {
                    b
                } else {
                    a
                }
            })
    }

    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let w = &mut md;
        let _ = writeln!(w, "# forward-bench results, {}\n", self.date);
        // The packet-level phase makes one pass per profile and path (a fresh link each time).
        let passes = if self.mode == "netem" {
            "one pass per profile and path".to_string()
        } else {
            format!(
                "{} round(s) with paths interleaved; every number is the median over rounds",
                self.rounds
            )
        };
        let _ = writeln!(
            w,
            "Mode **{}**, {passes}. Host: {}. Settings: {}. Run time {:.0} s.\n",
            self.mode, self.host, self.settings, self.elapsed_secs
        );
        if !self.paths.is_empty() {
            let _ = writeln!(w, "All traffic is on loopback, and the harness (client and backend) shares the CPUs \
                with the tunnel processes, so absolute numbers are a property of this machine; the ratios \
                are the point.\n");
            let _ = writeln!(w, "| path | what it is |\n|---|---|");
            for p in &self.paths {
                let _ = writeln!(w, "| {} | {} |", p.name, p.description);
            }
            self.summary(w);
            self.targets(w);
            self.throughput(w);
            self.latency(w);
        }
        self.scale(w);
        self.wan(w);
        self.netem(w);
        if !self.skipped.is_empty() || !self.notes.is_empty() {
            let _ = writeln!(w, "\n## Skipped and notes\n");
            for (path, why) in &self.skipped {
                let _ = writeln!(w, "- skipped `{path}`: {why}");
            }
            for n in &self.notes {
                let _ = writeln!(w, "- {n}");
            }
        }
        let errors: Vec<(String, String)> = self
            .paths
            .iter()
            .flat_map(|p| {
                p.rounds
                    .iter()
                    .flat_map(move |r| r.errors.iter().map(move |e| (p.name.clone(), e.clone())))
            })
            .collect();
        if !errors.is_empty() {
            let _ = writeln!(w, "\n## Workload errors\n");
            for (p, e) in errors {
                let _ = writeln!(w, "- `{p}`: {e}");
            }
        }
        md
    }

    /// One line per path with the headline numbers and their ratio to stunnel, the peer doing
    /// the same job (verified TLS through the same edge).
    fn summary(&self, w: &mut String) {
        let st = self.path("stunnel").map(|p| &p.median);
        let _ = writeln!(w, "\n## Summary\n");
        let _ = writeln!(
            w,
            "Medians. \"vs stunnel\" is this path's value divided by stunnel's (throughput: higher is \
             better; latency: lower is better).\n"
        );
        let _ = writeln!(
            w,
            "| path | down ×1 Gbit/s | vs stunnel | CPU %/Gbit/s | RTT p50 µs | RTT p99 µs | RTT p50 vs stunnel | connect p50 µs | connect vs stunnel |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let p50 = |r: &Round| r.rtt.as_ref().map(|p| p.p50_us);
        let c50 = |r: &Round| r.connect.as_ref().map(|p| p.p50_us);
        for p in &self.paths {
            let r = &p.median;
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                f(r.down1_gbps, 2),
                ratio_txt(r.down1_gbps, st.and_then(|s| s.down1_gbps)),
                f(r.cpu_pct_per_gbps, 0),
                f(p50(r), 1),
                f(r.rtt.as_ref().map(|p| p.p99_us), 1),
                ratio_txt(p50(r), st.and_then(p50)),
                f(c50(r), 1),
                ratio_txt(c50(r), st.and_then(c50)),
            );
        }
    }

    fn targets(&self, w: &mut String) {
        let _ = writeln!(w, "\n## Targets from the issues\n");
        let _ = writeln!(w, "| target | measured | met |\n|---|---|---|");
        let m = |name: &str| self.path(name).map(|p| &p.median);
        // `floor`: the same ratio for the tls-client path, i.e. with no relay process at all,
        // which no relay can beat through this edge.
        let floor_row = |w: &mut String,
                         what: &str,
                         measured: Option<f64>,
                         floor: Option<f64>,
                         goal: f64,
                         higher: bool,
                         unit: &str| {
            let floor = floor
                .map(|v| format!(" (tls-client, no relay: {v:.2}{unit})"))
                .unwrap_or_default();
            let (txt, ok) = match measured {
                Some(v) => (
                    format!("{v:.2}{unit}{floor}"),
                    if (higher && v >= goal) || (!higher && v <= goal) {
                        "yes"
                    } else {
                        "**no**"
                    },
                ),
                None => ("not measured".to_string(), "–"),
            };
            let _ = writeln!(w, "| {what} | {txt} | {ok} |");
        };
        let row =
            |w: &mut String,
             what: &str,
             measured: Option<f64>,
             goal: f64,
             higher: bool,
             unit: &str| floor_row(w, what, measured, None, goal, higher, unit);
        let direct = m("direct");
        let stunnel = m("stunnel");
        let floor = m("tls-client");
        let get = |r: Option<&Round>, f: fn(&Round) -> Option<f64>| r.and_then(f);
        let vs_stunnel =
            |p: Option<&Round>, f: fn(&Round) -> Option<f64>| ratio(get(p, f), get(stunnel, f));
        floor_row(
            w,
            "direct bytes/s ≥ 1.5× stunnel (download, 1 stream)",
            vs_stunnel(direct, |r| r.down1_gbps),
            vs_stunnel(floor, |r| r.down1_gbps),
            1.5,
            true,
            "×",
        );
        floor_row(
            w,
            "direct bytes/s ≥ 1.5× stunnel (upload, 1 stream)",
            vs_stunnel(direct, |r| r.up1_gbps),
            vs_stunnel(floor, |r| r.up1_gbps),
            1.5,
            true,
            "×",
        );
        let p50 = |r: &Round| r.rtt.as_ref().map(|p| p.p50_us);
        let c50 = |r: &Round| r.connect.as_ref().map(|p| p.p50_us);
        floor_row(
            w,
            "direct RTT p50 ≤ 0.85× stunnel",
            ratio(direct.and_then(p50), stunnel.and_then(p50)),
            ratio(floor.and_then(p50), stunnel.and_then(p50)),
            0.85,
            false,
            "×",
        );
        floor_row(
            w,
            "direct connect p50 ≤ 0.5× stunnel",
            ratio(direct.and_then(c50), stunnel.and_then(c50)),
            ratio(floor.and_then(c50), stunnel.and_then(c50)),
            0.5,
            false,
            "×",
        );
        for agent in AGENT_PATHS {
            if let Some(r) = m(agent) {
                row(
                    w,
                    &format!("{agent} download, 1 stream ≥ 0.9× direct"),
                    ratio(r.down1_gbps, get(direct, |d| d.down1_gbps)),
                    0.9,
                    true,
                    "×",
                );
                row(
                    w,
                    &format!("{agent} download, ×N streams together ≥ direct's 1 stream"),
                    ratio(r.down_n_gbps, get(direct, |d| d.down1_gbps)),
                    1.0,
                    true,
                    "×",
                );
                row(
                    w,
                    &format!("{agent} connect + first byte p50 ≤ 0.5 ms"),
                    c50(r).map(|us| us / 1000.0),
                    0.5,
                    false,
                    " ms",
                );
                row(
                    w,
                    &format!("{agent} connect + first byte p50 ≤ 0.3× direct"),
                    ratio(c50(r), direct.and_then(c50)),
                    0.3,
                    false,
                    "×",
                );
                // The same bytes/s target where a path, not this box's CPU, sets the pace:
                // on loopback the agent hop's copies share two cores with everything else.
                // (Profiles that run only the UDP paths have no direct row to compare with.)
                for wan in self.wan.iter().filter(|x| x.path == agent) {
                    let Some(direct_wan) = self
                        .wan
                        .iter()
                        .find(|d| d.profile == wan.profile && d.path == "direct")
                        .and_then(|d| d.down1_gbps)
                    else {
                        continue;
                    };
                    row(
                        w,
                        &format!(
                            "{agent} download, 1 stream ≥ 0.9× direct (emulated WAN {}: {} ms, {} Mbit/s)",
                            wan.profile,
                            wan.rtt_ms,
                            wan.mbit.map_or("–".to_string(), |m| m.to_string())
                        ),
                        ratio(wan.down1_gbps, Some(direct_wan)),
                        0.9,
                        true,
                        "×",
                    );
                }
                row(
                    w,
                    &format!(
                        "{agent} RTT p99 beside a bulk stream ≤ 2× idle p99 (loopback: CPU-bound)"
                    ),
                    ratio(
                        r.loaded_rtt.as_ref().map(|p| p.p99_us),
                        r.rtt.as_ref().map(|p| p.p99_us),
                    ),
                    2.0,
                    false,
                    "×",
                );
            }
        }
    }

    fn throughput(&self, w: &mut String) {
        let raw = self.path("raw").map(|p| &p.median);
        let best = self.best_peer(|r| r.down1_gbps, false);
        let _ = writeln!(w, "\n## Throughput (Gbit/s)\n");
        let _ = writeln!(
            w,
            "×N = parallel streams, their bytes over the wall time from the first one's first byte to the \
             last one's end. CPU is utime+stime of the path's processes (forward, edge, agent, \
             peers and their children) during the bulk workloads, in % of one core per Gbit/s: all / client side only. \
             Best peer by download ×1: {}.\n",
            best.as_ref().map(|b| b.0.as_str()).unwrap_or("none measured")
        );
        let _ = writeln!(
            w,
            "| path | down ×1 | up ×1 | down ×N | up ×N | down ×1 vs raw | vs best peer | CPU %/Gbit/s | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for p in &self.paths {
            let r = &p.median;
            let cpu = match (r.cpu_pct_per_gbps, r.client_cpu_pct_per_gbps) {
                (Some(a), Some(c)) => format!("{a:.0} / {c:.0}"),
                (Some(a), None) => format!("{a:.0} / –"),
                _ => "–".into(),
            };
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                f(r.down1_gbps, 2),
                f(r.up1_gbps, 2),
                f(r.down_n_gbps, 2),
                f(r.up_n_gbps, 2),
                ratio_txt(r.down1_gbps, raw.and_then(|r| r.down1_gbps)),
                ratio_txt(r.down1_gbps, best.as_ref().map(|b| b.1)),
                cpu,
                f(p.peak_rss_kib.map(|k| k as f64 / 1024.0), 1),
            );
        }
    }

    fn latency(&self, w: &mut String) {
        let best = self.best_peer(|r| r.rtt.as_ref().map(|p| p.p50_us), true);
        let best_c = self.best_peer(|r| r.connect.as_ref().map(|p| p.p50_us), true);
        let raw = self.path("raw").map(|p| &p.median);
        let _ = writeln!(w, "\n## Latency (µs)\n");
        let _ = writeln!(
            w,
            "1-byte ping-pong on one connection (RTT), the same while a bulk download runs on the path \
             (loaded), and connect + first byte on a fresh connection. Best peer by RTT p50: {}; by connect p50: {}.\n",
            best.as_ref().map(|b| b.0.as_str()).unwrap_or("none"),
            best_c.as_ref().map(|b| b.0.as_str()).unwrap_or("none")
        );
        let _ = writeln!(
            w,
            "| path | RTT p50 | p90 | p99 | p99.9 | max | p50 vs raw | p50 vs best peer | loaded p50 | loaded p99 | connect p50 | connect p99 | connect vs best peer | conns/s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for p in &self.paths {
            let r = &p.median;
            let rtt = |g: fn(&Percentiles) -> f64| f(r.rtt.as_ref().map(g), 1);
            let p50 = r.rtt.as_ref().map(|p| p.p50_us);
            let c50 = r.connect.as_ref().map(|p| p.p50_us);
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                rtt(|p| p.p50_us),
                rtt(|p| p.p90_us),
                rtt(|p| p.p99_us),
                rtt(|p| p.p999_us),
                rtt(|p| p.max_us),
                ratio_txt(p50, raw.and_then(|r| r.rtt.as_ref().map(|p| p.p50_us))),
                ratio_txt(p50, best.as_ref().map(|b| b.1)),
                f(r.loaded_rtt.as_ref().map(|p| p.p50_us), 1),
                f(r.loaded_rtt.as_ref().map(|p| p.p99_us), 1),
                f(c50, 1),
                f(r.connect.as_ref().map(|p| p.p99_us), 1),
                ratio_txt(c50, best_c.as_ref().map(|b| b.1)),
                f(r.conns_per_sec, 0),
            );
        }
    }

    fn scale(&self, w: &mut String) {
        if self.paths.iter().all(|p| p.scale.is_none()) {
            return;
        }
        let _ = writeln!(w, "\n## Scale: idle connections held open\n");
        let _ = writeln!(
            w,
            "Resident memory (VmRSS) of the path's processes, started afresh for this phase, before and after opening the connections; \
             per connection = the difference / connections opened.\n"
        );
        let _ = writeln!(w, "| path | opened | RSS before MiB | RSS after MiB | KiB per conn (all) | KiB per conn (client) | KiB per conn (PSS, all) | note |\n|---|---:|---:|---:|---:|---:|---:|---|");
        for p in &self.paths {
            if let Some(s) = &p.scale {
                let _ = writeln!(
                    w,
                    "| {} | {} / {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
                    p.name,
                    s.opened,
                    s.requested,
                    s.rss_before_kib as f64 / 1024.0,
                    s.rss_after_kib as f64 / 1024.0,
                    s.per_conn_kib,
                    s.client_per_conn_kib,
                    s.pss_per_conn_kib,
                    s.note.as_deref().unwrap_or("")
                );
            }
        }
    }

    fn wan(&self, w: &mut String) {
        if self.wan.is_empty() {
            return;
        }
        let _ = writeln!(w, "\n## Emulated WAN\n");
        let _ = writeln!(
            w,
            "A user-space relay on the middle hop (client side → edge/agent/sshd) adds half the RTT each way \
             and caps the bandwidth per direction with a token bucket; its queue holds two bandwidth-delay \
             products. The relay terminates TCP, so kernel window auto-tuning sees loopback; what fills or \
             fails to fill the pipe here is the tunnel's own flow control and buffering. \
             Fill = achieved download ×1 / emulated bandwidth. Loss and reordering \
             exist only in the UDP relay (the TCP relay's own connections are lossless), so the \
             lossy profile (lossy50: 0.1 % loss, 0.1 % reordered by a quarter of the one-way delay) \
             runs the UDP paths only.\n"
        );
        let _ = writeln!(w, "| profile | RTT ms | cap Mbit/s | path | down ×1 Mbit/s | up ×1 Mbit/s | fill | RTT p50 ms | RTT p99 ms | note |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---|");
        for r in &self.wan {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.profile,
                r.rtt_ms,
                r.mbit.map(|m| m.to_string()).unwrap_or_else(|| "∞".into()),
                r.path,
                f(r.down1_gbps.map(|g| g * 1000.0), 0),
                f(r.up1_gbps.map(|g| g * 1000.0), 0),
                r.fill
                    .map(|x| format!("{:.0} %", x * 100.0))
                    .unwrap_or_else(|| "–".into()),
                f(r.rtt.as_ref().map(|p| p.p50_us / 1000.0), 1),
                f(r.rtt.as_ref().map(|p| p.p99_us / 1000.0), 1),
                r.error.as_deref().unwrap_or("")
            );
        }
    }
}

impl Report {
    fn netem_row(&self, profile: &str, path: &str) -> Option<&NetemRow> {
        self.netem
            .iter()
            .find(|r| r.profile == profile && r.path == path)
    }

    fn netem(&self, w: &mut String) {
        if self.netem.is_empty() {
            return;
        }
        let _ = writeln!(w, "\n## Packet-level WAN (--netem)\n");
        let _ = writeln!(
            w,
            "The VM side (edge, agent, backend) runs in its own network namespace, the client side \
             (forward, the measuring client) in the root namespace; every IP packet between them \
             crosses a user-space link between two TUN devices. Per direction the link serialises \
             packets at the rate (IP bytes counted, so TCP payload tops out near 95 % of it), holds \
             at most the queue in front of that (drop-tail, one bandwidth-delay product), adds half \
             the RTT, and loses packets at random with the given probability. The kernels' TCP \
             stacks see all of it. Fill = bulk download alone / emulated bandwidth; settled fill = the \
             same from a third of the transfer on (ramp-up left out); loaded = 1-byte \
             round trips on a second connection while a bulk download runs on the same path (for \
             the agent paths, two streams of one carrier); connect = connect to the path's local \
             port, send a byte, read its echo, one connection after another. Lost / queue-dropped \
             = packets of the VM → client direction.\n"
        );
        let _ = writeln!(
            w,
            "| profile | RTT ms | Mbit/s | loss each way | queue KiB | path | down Mbit/s | fill | settled fill | idle RTT p50 ms | idle p99 ms | connect p50 ms | loaded RTT p50 ms | loaded p99 ms | loaded bulk Mbit/s | lost / queue-dropped | note |\n\
             |---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        let pct = |x: Option<f64>| {
            x.map(|x| format!("{:.0} %", x * 100.0))
                .unwrap_or_else(|| "–".into())
        };
        let ms = |p: &Option<Percentiles>, g: fn(&Percentiles) -> f64| {
            f(p.as_ref().map(|p| g(p) / 1000.0), 1)
        };
        for r in &self.netem {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} % | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.profile,
                r.rtt_ms,
                r.mbit,
                r.loss_pct,
                r.queue_bytes / 1024,
                r.path,
                f(r.down_mbps, 1),
                pct(r.fill),
                pct(r.settled_fill),
                ms(&r.idle_rtt, |p| p.p50_us),
                ms(&r.idle_rtt, |p| p.p99_us),
                ms(&r.connect, |p| p.p50_us),
                ms(&r.loaded_rtt, |p| p.p50_us),
                ms(&r.loaded_rtt, |p| p.p99_us),
                f(r.loaded_down_mbps, 1),
                r.link_down
                    .map(|d| format!("{} / {}", d.lost, d.queue_drops))
                    .unwrap_or_else(|| "–".into()),
                r.error.as_deref().unwrap_or("")
            );
        }
        let ratios: Vec<String> = self
            .netem
            .iter()
            .filter(|r| AGENT_PATHS.contains(&r.path.as_str()))
            .filter_map(|r| {
                let idle = r.idle_rtt.as_ref()?.p99_us;
                let loaded = r.loaded_rtt.as_ref()?.p99_us;
                let x = loaded / idle;
                let met = if x <= 2.0 { "met" } else { "**not met**" };
                Some(format!(
                    "{} {}: {:.1} / {:.1} ms = {x:.2}× ({met})",
                    r.profile,
                    r.path,
                    loaded / 1000.0,
                    idle / 1000.0
                ))
            })
            .collect();
        if !ratios.is_empty() {
            let _ = writeln!(
                w,
                "\n### Issue #3 target: interactive round trip p99 beside a bulk stream ≤ 2× its idle p99\n"
            );
            for l in ratios {
                let _ = writeln!(w, "- {l}");
            }
        }
        if self.netem.iter().any(|r| !r.sharing.is_empty()) {
            let _ = writeln!(
                w,
                "\n### Sharing the link with an ordinary TCP flow\n\n\
                 One download through the path and, at the same time, one raw TCP download straight \
                 from the backend, over the same bottleneck; settled rates, from a third of the time \
                 on. The raw flow's sender runs the competitor's congestion control: the system's \
                 default, then Cubic (most laptops and servers). Equal shares are 50 %; raw beside \
                 raw shows what two ordinary flows do here.\n"
            );
            let _ = writeln!(
                w,
                "| profile | path | competitor | path Mbit/s | competitor Mbit/s | path's share |\n\
                 |---|---|---|---:|---:|---:|"
            );
            for r in &self.netem {
                for sh in &r.sharing {
                    let total = sh.path_mbps + sh.competitor_mbps;
                    let share = if total > 0.0 {
                        format!("{:.0} %", sh.path_mbps / total * 100.0)
                    } else {
                        "–".into()
                    };
                    let _ = writeln!(
                        w,
                        "| {} | {} | {} | {:.1} | {:.1} | {share} |",
                        r.profile, r.path, sh.competitor, sh.path_mbps, sh.competitor_mbps
                    );
                }
            }
        }
        let lines = self.netem_throughput();
        if !lines.is_empty() {
            let _ = writeln!(
                w,
                "\n### Issue #3 target: one stream ≥ 0.9× direct mode's download, over the link\n\n\
                 Bulk download alone, each agent path against direct in the same profile. Here \
                 every path's congestion control sees the link's round trip and loss, unlike the \
                 TCP relay of the full mode's WAN profiles, which hides them from direct's TCP.\n"
            );
            for l in lines {
                let _ = writeln!(w, "- {l}");
            }
        }
        let lines = self.netem_connects();
        if !lines.is_empty() {
            let _ = writeln!(
                w,
                "\n### Connect + first byte over the link\n\n\
                 p50, and in round trips of the profile. A path pays one round trip for the first \
                 byte's echo, one for each TCP handshake that crosses the link and one for a TLS 1.3 \
                 handshake; the agent paths cross it on a carrier that is already open.\n"
            );
            for l in lines {
                let _ = writeln!(w, "- {l}");
            }
        }
        let lines = self.netem_targets();
        if !lines.is_empty() {
            let _ = writeln!(w, "\n### Issue #5 targets\n");
            for l in lines {
                let _ = writeln!(w, "- {l}");
            }
        }
    }

    /// Per profile and agent path: its bulk download over direct mode's, against issue #3's
    /// 0.9×.
    pub fn netem_throughput(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.netem {
            if !AGENT_PATHS.contains(&r.path.as_str()) {
                continue;
            }
            let direct = self
                .netem_row(&r.profile, "direct")
                .and_then(|d| d.down_mbps);
            if let (Some(mine), Some(direct)) = (r.down_mbps, direct) {
                let x = mine / direct;
                let met = if x >= 0.9 { "met" } else { "**not met**" };
                out.push(format!(
                    "{} {}: {mine:.1} / {direct:.1} Mbit/s = {x:.2}× ({met})",
                    r.profile, r.path
                ));
            }
        }
        out
    }

    /// Per profile: every path's connect p50 in ms and round trips, then the connect targets of
    /// issues #2 (direct ≤ 0.5× stunnel) and #3 (an agent path ≤ 0.3× direct) where both sides
    /// were measured.
    pub fn netem_connects(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut profiles: Vec<&str> = Vec::new();
        for r in &self.netem {
            if !profiles.contains(&r.profile.as_str()) {
                profiles.push(&r.profile);
            }
        }
        let p50 = |r: &NetemRow| r.connect.as_ref().map(|p| p.p50_us / 1000.0);
        for profile in profiles {
            let rows: Vec<(&NetemRow, f64)> = self
                .netem
                .iter()
                .filter(|r| r.profile == profile)
                .filter_map(|r| p50(r).map(|ms| (r, ms)))
                .collect();
            let Some((first, _)) = rows.first() else {
                continue;
            };
            let rtt = first.rtt_ms as f64;
            let each: Vec<String> = rows
                .iter()
                .map(|(r, ms)| format!("{} {ms:.1} ms = {:.1} RTT", r.path, ms / rtt))
                .collect();
            out.push(format!("{profile} ({rtt} ms): {}", each.join(" · ")));
            let of = |path: &str| rows.iter().find(|(r, _)| r.path == path).map(|(_, ms)| *ms);
            let verdict = |x: f64, goal: f64| if x <= goal { "met" } else { "**not met**" };
            if let (Some(direct), Some(stunnel)) = (of("direct"), of("stunnel")) {
                let x = direct / stunnel;
                out.push(format!(
                    "{profile} issue #2, direct ≤ 0.5× stunnel: {x:.2}× ({})",
                    verdict(x, 0.5)
                ));
            }
            if let Some(direct) = of("direct") {
                for path in AGENT_PATHS {
                    if let Some(ms) = of(path) {
                        let x = ms / direct;
                        out.push(format!(
                            "{profile} issue #3, {path} ≤ 0.3× direct: {x:.2}× ({})",
                            verdict(x, 0.3)
                        ));
                    }
                }
            }
        }
        out
    }

    /// One line per issue #5 speed target that the measured profiles can answer.
    pub fn netem_targets(&self) -> Vec<String> {
        let mut out = Vec::new();
        let p99_ms = |r: &NetemRow| r.loaded_rtt.as_ref().map(|p| p.p99_us / 1000.0);
        let lossy50 = self
            .netem
            .iter()
            .find(|r| r.rtt_ms == 50 && r.loss_pct > 0.0)
            .map(|r| r.profile.clone());
        if let Some(profile) = lossy50 {
            let quic = self.netem_row(&profile, "quic").and_then(p99_ms);
            let tcp: Vec<(&str, f64)> = ["agent-tls", "agent-tcp"]
                .into_iter()
                .filter_map(|c| self.netem_row(&profile, c).and_then(p99_ms).map(|v| (c, v)))
                .collect();
            let loss = self
                .netem
                .iter()
                .find(|r| r.profile == profile)
                .map(|r| r.loss_pct)
                .unwrap_or(0.0);
            let theirs = tcp
                .iter()
                .map(|(c, v)| format!("{c} {v:.1} ms"))
                .collect::<Vec<_>>()
                .join(", ");
            let verdict = match quic {
                Some(q) if !tcp.is_empty() => {
                    if tcp.iter().all(|(_, v)| q < *v) {
                        "met"
                    } else {
                        "**not met**"
                    }
                }
                _ => "not measured",
            };
            out.push(format!(
                "interactive p99 under bulk at 50 ms / {loss} % loss ({profile}): quic {} vs {} — {verdict}",
                quic.map(|q| format!("{q:.1} ms")).unwrap_or_else(|| "–".into()),
                if theirs.is_empty() { "no TCP carrier measured".into() } else { theirs },
            ));
        }
        let wan100 = self
            .netem
            .iter()
            .find(|r| r.rtt_ms == 100 && r.loss_pct == 0.0)
            .map(|r| (r.profile.clone(), r.mbit));
        if let Some((profile, mbit)) = wan100 {
            let fills: Vec<String> = self
                .netem
                .iter()
                .filter(|r| r.profile == profile)
                .map(|r| {
                    let pct = |x: Option<f64>| {
                        x.map(|x| format!("{:.0} %", x * 100.0))
                            .unwrap_or_else(|| "–".into())
                    };
                    let ok = match r.settled_fill {
                        Some(x) if x >= FILL_GOAL => "",
                        Some(_) => " (short)",
                        None => "",
                    };
                    format!(
                        "{} {} ({} overall){ok}",
                        r.path,
                        pct(r.settled_fill),
                        pct(r.fill)
                    )
                })
                .collect();
            out.push(format!(
                "bulk fill at 100 ms ({profile}, {mbit} Mbit/s; settled fill, goal ≥ {:.0} %; the most TCP \
                 payload a link counting IP bytes carries is ~95 %): {}",
                FILL_GOAL * 100.0,
                fills.join(", ")
            ));
        }
        out
    }
}

/// The paths that carry streams over one carrier to an agent, each judged against direct mode.
const AGENT_PATHS: [&str; 3] = ["agent-tls", "agent-tcp", "quic"];

/// "Reaches the emulated bandwidth": 90 % of it, as payload over a link that counts IP bytes.
const FILL_GOAL: f64 = 0.9;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::new_histogram;

    fn path(name: &str, peer: bool, down: f64, rtt_us: f64) -> PathReport {
        let round = Round {
            down1_gbps: Some(down),
            up1_gbps: Some(down / 2.0),
            rtt: Some(Percentiles {
                p50_us: rtt_us,
                ..Default::default()
            }),
            connect: Some(Percentiles {
                p50_us: rtt_us * 4.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        PathReport {
            name: name.into(),
            description: "d".into(),
            peer,
            median: summarize(std::slice::from_ref(&round)),
            rounds: vec![round],
            ..Default::default()
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn markdown_has_ratios_and_targets() {
        let report = Report {
            date: "2026-11-28".into(),
            mode: "quick".into(),
            rounds: 1,
            paths: vec![
                path("raw", false, 20.0, 20.0),
                path("direct", false, 6.0, 40.0),
                path("stunnel", true, 3.0, 80.0),
                path("agent-tcp", false, 5.7, 45.0),
            ],
            wan: vec![
                WanRow {
                    profile: "wan100".into(),
                    rtt_ms: 100,
                    mbit: Some(100),
                    path: "direct".into(),
                    down1_gbps: Some(0.095),
                    fill: Some(0.95),
                    ..Default::default()
                },
                WanRow {
                    profile: "wan100".into(),
                    rtt_ms: 100,
                    mbit: Some(100),
                    path: "agent-tcp".into(),
                    down1_gbps: Some(0.0874),
                    fill: Some(0.874),
                    ..Default::default()
                },
                // A profile without direct mode (the lossy one runs UDP paths only).
                WanRow {
                    profile: "lossy50".into(),
                    rtt_ms: 50,
                    mbit: Some(100),
                    path: "agent-tcp".into(),
                    down1_gbps: Some(0.05),
                    ..Default::default()
                },
            ],
            skipped: vec![("ssh".into(), "sshd not installed".into())],
            ..Default::default()
        };
        let md = report.to_markdown();
        assert!(md.contains("| direct | 6.00 | 3.00 |"), "{md}");
        assert!(
            md.contains("| direct | 6.00 | 2.00× |"),
            "summary row: {md}"
        );
        // 6 / 3 = 2× stunnel: the target is met; RTT 40 vs 80 = 0.5×.
        assert!(
            md.contains("| direct bytes/s ≥ 1.5× stunnel (download, 1 stream) | 2.00× | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| direct RTT p50 ≤ 0.85× stunnel | 0.50× | yes |"),
            "{md}"
        );
        assert!(md.contains("0.30×"), "direct vs raw download: {md}");
        // The agent issue's targets are measured against direct mode: 5.7 / 6 = 0.95×.
        assert!(
            md.contains("| agent-tcp download, 1 stream ≥ 0.9× direct | 0.95× | yes |"),
            "{md}"
        );
        assert!(md.contains("| wan100 | 100 | 100 | direct | 95 |"), "{md}");
        // And where the path sets the pace: 87.4 / 95 Mbit/s = 0.92×.
        assert!(
            md.contains(
                "| agent-tcp download, 1 stream ≥ 0.9× direct (emulated WAN wan100: 100 ms, 100 Mbit/s) | 0.92× | yes |"
            ),
            "{md}"
        );
        assert!(!md.contains("(emulated WAN lossy50"), "{md}");
        assert!(md.contains("95 %"));
        assert!(md.contains("skipped `ssh`: sshd not installed"));
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("\"down1_gbps\":6.0"));
    }

    /// With the tls-client path measured, direct mode's targets against stunnel also say what
    /// no relay at all would score: the floor this edge leaves.
    #[test]
    fn targets_show_the_no_relay_floor() {
        let report = Report {
            paths: vec![
                path("tls-client", false, 7.0, 30.0),
                path("direct", false, 6.0, 40.0),
                path("stunnel", true, 3.0, 80.0),
            ],
            ..Default::default()
        };
        let md = report.to_markdown();
        assert!(
            md.contains(
                "| direct bytes/s ≥ 1.5× stunnel (download, 1 stream) | 2.00× (tls-client, no relay: 2.33×) | yes |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| direct RTT p50 ≤ 0.85× stunnel | 0.50× (tls-client, no relay: 0.38×) | yes |"
            ),
            "{md}"
        );
        // Without it, the rows are as before.
        let report = Report {
            paths: vec![
                path("direct", false, 6.0, 40.0),
                path("stunnel", true, 3.0, 80.0),
            ],
            ..Default::default()
        };
        let md = report.to_markdown();
        assert!(
            md.contains("| direct RTT p50 ≤ 0.85× stunnel | 0.50× | yes |"),
            "{md}"
        );
    }

    fn netem_row(
        profile: &str,
        rtt_ms: u64,
        loss_pct: f64,
        path: &str,
        fill: f64,
        p99_ms: f64,
    ) -> NetemRow {
        NetemRow {
            profile: profile.into(),
            rtt_ms,
            mbit: 100,
            loss_pct,
            queue_bytes: 625_000,
            path: path.into(),
            down_mbps: Some(fill * 100.0),
            fill: Some(fill),
            settled_fill: Some(fill),
            idle_rtt: Some(Percentiles {
                p50_us: rtt_ms as f64 * 1000.0,
                p99_us: rtt_ms as f64 * 1000.0 + 2_000.0,
                ..Default::default()
            }),
            loaded_rtt: Some(Percentiles {
                p50_us: 60_000.0,
                p99_us: p99_ms * 1000.0,
                ..Default::default()
            }),
            // One round trip on a carrier, three with a TCP and a TLS handshake.
            connect: Some(Percentiles {
                p50_us: rtt_ms as f64 * if path == "direct" { 3000.0 } else { 1000.0 },
                ..Default::default()
            }),
            sharing: if path == "quic" {
                vec![Sharing {
                    competitor: "cubic".into(),
                    path_mbps: 60.0,
                    competitor_mbps: 30.0,
                }]
            } else {
                Vec::new()
            },
            ..Default::default()
        }
    }

    #[test]
    fn netem_table_and_issue_5_lines() {
        let report = Report {
            mode: "netem".into(),
            netem: vec![
                netem_row("loss50", 50, 1.0, "agent-tls", 0.5, 180.0),
                netem_row("loss50", 50, 1.0, "quic", 0.1, 120.0),
                netem_row("wan100", 100, 0.0, "quic", 0.93, 110.0),
                netem_row("wan100", 100, 0.0, "agent-tls", 0.6, 110.0),
                netem_row("wan100", 100, 0.0, "direct", 0.9, 150.0),
            ],
            ..Default::default()
        };
        let md = report.to_markdown();
        assert!(
            !md.contains("## Summary"),
            "no loopback tables in a netem run: {md}"
        );
        assert!(
            md.contains("Mode **netem**, one pass per profile and path."),
            "no claim of rounds the netem phase does not run: {md}"
        );
        assert!(
            md.contains("| loss50 | 50 | 100 | 1 % | 610 | quic | 10.0 | 10 % | 10 % |"),
            "{md}"
        );
        // Loaded p99 over idle p99 (rtt + 2 ms), for the issue #3 target.
        assert!(
            md.contains("- loss50 agent-tls: 180.0 / 52.0 ms = 3.46× (**not met**)"),
            "{md}"
        );
        assert!(
            md.contains("- wan100 quic: 110.0 / 102.0 ms = 1.08× (met)"),
            "{md}"
        );
        assert!(
            md.contains("| wan100 | 100 | 100 | 0 % | 610 | direct | 90.0 | 90 % | 90 % | 100.0 | 102.0 | 300.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| loss50 | quic | cubic | 60.0 | 30.0 | 67 % |"),
            "one row per path and competitor measured: {md}"
        );
        assert!(!md.contains("| wan100 | direct | cubic |"), "{md}");
        // Only where direct was measured too.
        assert_eq!(
            report.netem_throughput(),
            [
                "wan100 quic: 93.0 / 90.0 Mbit/s = 1.03× (met)",
                "wan100 agent-tls: 60.0 / 90.0 Mbit/s = 0.67× (**not met**)",
            ]
        );
        assert!(
            md.contains("- wan100 agent-tls: 60.0 / 90.0 Mbit/s = 0.67× (**not met**)"),
            "{md}"
        );
        let connects = report.netem_connects();
        assert_eq!(
            connects,
            [
                "loss50 (50 ms): agent-tls 50.0 ms = 1.0 RTT · quic 50.0 ms = 1.0 RTT",
                "wan100 (100 ms): quic 100.0 ms = 1.0 RTT · agent-tls 100.0 ms = 1.0 RTT · direct 300.0 ms = 3.0 RTT",
                "wan100 issue #3, agent-tls ≤ 0.3× direct: 0.33× (**not met**)",
                "wan100 issue #3, quic ≤ 0.3× direct: 0.33× (**not met**)",
            ]
        );
        let lines = report.netem_targets();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].contains("quic 120.0 ms vs agent-tls 180.0 ms — met"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("quic 93 % (93 % overall), agent-tls 60 % (60 % overall) (short)"),
            "{}",
            lines[1]
        );
        let json = serde_json::to_string(&report).unwrap();
        assert!(
            json.contains("\"netem\":[{\"profile\":\"loss50\""),
            "{json}"
        );
    }

    #[test]
    fn cdf_is_monotonic_and_ends_at_100() {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let c = cdf(&h);
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(c.last().unwrap().1, 100.0);
        assert!((c.last().unwrap().0 - 1000.0).abs() < 2.0);
    }
}
