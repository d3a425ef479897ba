//! SVG plots of a report: throughput per path (grouped bars) and latency CDFs per path.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::report::{Report, Round};

const COLORS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Reads one throughput figure of a path.
type Metric = fn(&Round) -> Option<f64>;

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plot: {e}")
}

/// Bars per path for download/upload with one and N streams.
pub fn throughput(report: &Report, file: &Path) -> anyhow::Result<()> {
    let metrics: [(&str, Metric); 4] = [
        ("down ×1", |r| r.down1_gbps),
        ("up ×1", |r| r.up1_gbps),
        ("down ×N", |r| r.down_n_gbps),
        ("up ×N", |r| r.up_n_gbps),
    ];
    let groups: Vec<String> = report.paths.iter().map(|p| p.name.clone()).collect();
    let series: Vec<(String, Vec<Option<f64>>)> = metrics
        .iter()
        .map(|(label, get)| {
            let values = report.paths.iter().map(|p| get(&p.median)).collect();
            (label.to_string(), values)
        })
        .collect();
    let title = format!(
        "Throughput per path, Gbit/s ({}, median of {} round(s))",
        report.date, report.rounds
    );
    grouped_bars(&title, "Gbit/s", &groups, &series, file)
}

/// Achieved / emulated bandwidth per path, one bar per WAN profile.
pub fn wan_fill(report: &Report, file: &Path) -> anyhow::Result<()> {
    let mut groups: Vec<String> = Vec::new();
    let mut profiles: Vec<String> = Vec::new();
    for row in &report.wan {
        if !groups.contains(&row.path) {
            groups.push(row.path.clone());
        }
        if !profiles.contains(&row.profile) {
            profiles.push(row.profile.clone());
        }
    }
    let series: Vec<(String, Vec<Option<f64>>)> = profiles
        .iter()
        .map(|prof| {
            let label = report
                .wan
                .iter()
                .find(|r| &r.profile == prof)
                .map(|r| {
                    let cap = r.mbit.map(|m| format!("{m} Mbit/s")).unwrap_or("∞".into());
                    format!("{prof}: {} ms, {cap}", r.rtt_ms)
                })
                .unwrap_or_else(|| prof.clone());
            let values = groups
                .iter()
                .map(|g| {
                    report
                        .wan
                        .iter()
                        .find(|r| &r.profile == prof && &r.path == g)
                        .and_then(|r| r.fill)
                        .map(|f| f * 100.0)
                })
                .collect();
            (label, values)
        })
        .collect();
    grouped_bars(
        "Emulated WAN: download ×1 as % of the emulated bandwidth",
        "% of the link",
        &groups,
        &series,
        file,
    )
}

/// One group of bars per entry of `groups`, one bar per series, values printed on the bars.
fn grouped_bars(
    title: &str,
    y_desc: &str,
    groups: &[String],
    series: &[(String, Vec<Option<f64>>)],
    file: &Path,
) -> anyhow::Result<()> {
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .fold(0.0f64, f64::max)
        .max(0.1)
        * 1.2;
    // Each group gets one slot per series plus one slot of gap; x is in slots.
    let slots = series.len() + 1;
    let width = (groups.len() * slots).max(1) as f64;
    let root = SVGBackend::new(file, (1000, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..width, 0.0..max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    for (s, (label, values)) in series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        chart
            .draw_series(values.iter().enumerate().filter_map(|(i, v)| {
                let x0 = (i * slots + s) as f64 + 0.5;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + 0.9, (*v)?)],
                    color.filled(),
                ))
            }))
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        // The value above each bar: tunnels are often a small fraction of raw loopback.
        chart
            .draw_series(values.iter().enumerate().filter_map(|(i, v)| {
                let v = (*v)?;
                let x = (i * slots + s) as f64 + 0.95;
                let style = TextStyle::from(("sans-serif", 10).into_font()).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Bottom,
                    ),
                );
                Some(Text::new(format!("{v:.1}"), (x, v + max * 0.005), style))
            }))
            .map_err(err)?;
    }
    // Group names under the axis: placed in pixels, since the x axis counts slots.
    for (i, n) in groups.iter().enumerate() {
        let center = (i * slots) as f64 + 0.5 + series.len() as f64 / 2.0;
        let (px, py) = chart.backend_coord(&(center, 0.0));
        let style = TextStyle::from(("sans-serif", 15).into_font()).pos(
            plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Top,
            ),
        );
        root.draw_text(n, &style, (px, py + 10)).map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// A CDF per path from `(µs, percentile)` points, log-scaled latency.
pub fn latency_cdf(
    report: &Report,
    title: &str,
    pick: fn(&crate::report::PathReport) -> &Vec<(f64, f64)>,
    file: &Path,
) -> anyhow::Result<()> {
    let curves: Vec<(&str, &Vec<(f64, f64)>)> = report
        .paths
        .iter()
        .map(|p| (p.name.as_str(), pick(p)))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    let lo = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.0))
        .fold(f64::MAX, f64::min)
        .max(1.0);
    let hi = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.0))
        .fold(0.0, f64::max)
        .max(lo * 2.0);
    let root = SVGBackend::new(file, (1000, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((lo * 0.8..hi * 1.2).log_scale(), 0.0..100.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("latency, µs (log scale)")
        .y_desc("percentile")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    for (i, (name, points)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::PathReport;

    #[test]
    fn plots_render_to_svg() {
        let dir = std::env::temp_dir().join(format!("forward-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut report = Report {
            date: "2026-11-28".into(),
            rounds: 1,
            ..Default::default()
        };
        for (i, name) in ["raw", "direct"].iter().enumerate() {
            report.paths.push(PathReport {
                name: name.to_string(),
                median: Round {
                    down1_gbps: Some(10.0 / (i + 1) as f64),
                    up1_gbps: Some(5.0),
                    ..Default::default()
                },
                rtt_cdf: vec![(10.0 * (i + 1) as f64, 0.0), (50.0, 50.0), (200.0, 100.0)],
                ..Default::default()
            });
        }
        let t = dir.join("t.svg");
        throughput(&report, &t).unwrap();
        let svg = std::fs::read_to_string(&t).unwrap();
        assert!(svg.contains("<svg") && svg.contains("direct") && svg.contains("down ×1"));
        report.wan.push(crate::report::WanRow {
            profile: "wan100".into(),
            rtt_ms: 100,
            mbit: Some(100),
            path: "direct".into(),
            fill: Some(0.97),
            ..Default::default()
        });
        let w = dir.join("w.svg");
        wan_fill(&report, &w).unwrap();
        assert!(std::fs::read_to_string(&w).unwrap().contains("97.0"));
        let l = dir.join("l.svg");
        latency_cdf(&report, "RTT", |p| &p.rtt_cdf, &l).unwrap();
        assert!(std::fs::read_to_string(&l).unwrap().contains("raw"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
