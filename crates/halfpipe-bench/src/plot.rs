//! `halfpipe-bench --plot IN.json OUT.svg`: the comparison chart.
//!
//! One bar chart per scenario metric, the implementations side by side in
//! the same colours in every panel, with the date and the machine (host,
//! CPU model, cores) in the title. plotters' SVG backend only: text is
//! left to the SVG viewer's fonts, so rendering needs no font files.

use super::report::{Compare, Report};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

const PALETTE: [RGBColor; 8] = [
    RGBColor(0x55, 0x55, 0x55), // the first run: direct TCP, in grey
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
];
const LIMIT: RGBColor = RGBColor(0xbb, 0xbb, 0xbb);

struct Bar {
    /// Written above the bar when set (else the value alone).
    label: Option<String>,
    value: f64,
    color: RGBColor,
}

struct Panel {
    title: String,
    bars: Vec<Bar>,
}

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn fmt(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A panel with one bar per run that has the metric.
fn per_run(c: &Compare, title: String, metric: impl Fn(&Report) -> Option<f64>) -> Option<Panel> {
    let bars: Vec<Bar> = c
        .runs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            metric(r).map(|value| Bar {
                label: None,
                value,
                color: color(i),
            })
        })
        .collect();
    (!bars.is_empty()).then_some(Panel { title, bars })
}

fn panels(c: &Compare) -> Vec<Panel> {
    let mut out = Vec::new();
    let any = |f: &dyn Fn(&Report) -> bool| c.runs.iter().find(|r| f(r)).cloned();
    if let Some(r) = any(&|r| r.bulk.is_some()) {
        let size = r.bulk.as_ref().map_or(0, |b| b.size_mib);
        out.extend(per_run(
            c,
            format!("bulk upload, one stream, {size} MiB: MiB/s"),
            |r| r.bulk.as_ref().map(|b| b.upload.mib_s),
        ));
        out.extend(per_run(
            c,
            format!("bulk download, one stream, {size} MiB: MiB/s"),
            |r| r.bulk.as_ref().map(|b| b.download.mib_s),
        ));
    }
    if let Some(r) = any(&|r| r.parallel.is_some()) {
        let k = r.parallel.as_ref().map_or(0, |p| p.streams);
        out.extend(per_run(
            c,
            format!("parallel upload, {k} streams: aggregate MiB/s"),
            |r| r.parallel.as_ref().map(|p| p.upload.aggregate_mib_s),
        ));
        out.extend(per_run(
            c,
            format!("parallel download, {k} streams: aggregate MiB/s"),
            |r| r.parallel.as_ref().map(|p| p.download.aggregate_mib_s),
        ));
        out.extend(per_run(
            c,
            format!("parallel download, {k} streams: Jain's fairness index"),
            |r| r.parallel.as_ref().map(|p| p.download.fairness),
        ));
    }
    let mut levels: Vec<usize> = c
        .runs
        .iter()
        .flat_map(|r| r.setup.iter().map(|s| s.concurrency))
        .collect();
    levels.sort_unstable();
    levels.dedup();
    for &conc in &levels {
        out.extend(per_run(
            c,
            format!("setup, concurrency {conc}: request/response streams per second"),
            |r| {
                r.setup
                    .iter()
                    .find(|s| s.concurrency == conc)
                    .map(|s| s.streams_per_s)
            },
        ));
    }
    if let Some(&first) = levels.first() {
        out.extend(per_run(
            c,
            format!("setup, concurrency {first}: p50 latency, us (lower is better)"),
            |r| {
                r.setup
                    .iter()
                    .find(|s| s.concurrency == first)
                    .map(|s| s.latency_us.p50)
            },
        ));
    }
    let mut holds: Vec<usize> = c
        .runs
        .iter()
        .flat_map(|r| r.hold.iter().map(|h| h.streams))
        .collect();
    holds.sort_unstable();
    holds.dedup();
    for &n in &holds {
        out.extend(per_run(
            c,
            format!("hold {n} idle streams: KiB per stream (PSS, all processes; lower is better)"),
            // PSS, not RSS: a forking proxy's shared pages would count once
            // per process in an RSS sum.
            |r| {
                r.hold
                    .iter()
                    .find(|h| h.streams == n && !h.processes.is_empty())
                    .map(|h| h.pss_kib_per_stream)
            },
        ));
    }
    if any(&|r| r.slow.is_some()).is_some() {
        out.extend(per_run(
            c,
            "slow reader: others' throughput kept beside a stalled stream, %".into(),
            |r| r.slow.as_ref().map(|s| s.kept * 100.0),
        ));
    }
    for (i, r) in c.runs.iter().enumerate() {
        if let Some(x) = &r.rtt {
            out.push(Panel {
                title: format!(
                    "rtt, {} ms each way: one stream vs the window limit, MiB/s ({})",
                    x.delay_ms, r.label
                ),
                bars: vec![
                    Bar {
                        label: Some(format!("limit {}", fmt(x.limit_mib_s))),
                        value: x.limit_mib_s,
                        color: LIMIT,
                    },
                    Bar {
                        label: Some(format!("upload {}", fmt(x.upload.mib_s))),
                        value: x.upload.mib_s,
                        color: color(i),
                    },
                    Bar {
                        label: Some(format!("download {}", fmt(x.download.mib_s))),
                        value: x.download.mib_s,
                        color: color(i),
                    },
                ],
            });
        }
    }
    out
}

/// Renders the chart of `c` into `out` (SVG).
pub fn render(c: &Compare, out: &Path) -> Result<(), String> {
    let panels = panels(c);
    if panels.is_empty() {
        return Err("nothing to plot: the document has no scenario results".into());
    }
    let cols = 2usize;
    let rows = panels.len().div_ceil(cols);
    let (width, panel_h, head_h) = (1400u32, 300u32, 120u32);
    let height = head_h + panel_h * rows as u32;
    let e = |e: DrawingAreaErrorKind<_>| format!("plot: {e}");
    let root = SVGBackend::new(out, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let (head, body) = root.split_vertically(head_h);

    let m = &c.machine;
    let title = format!("halfpipe-bench: {} runs side by side", c.runs.len());
    let caption = format!(
        "{} · {} · {} · {} cores · Linux {} · loopback",
        c.date, m.hostname, m.cpu, m.cores, m.kernel
    );
    head.draw(&Text::new(title, (20, 12), ("sans-serif", 26).into_font()))
        .map_err(e)?;
    head.draw(&Text::new(
        caption,
        (20, 46),
        ("sans-serif", 15).into_font(),
    ))
    .map_err(e)?;
    if !c.notes.is_empty() {
        let notes = c.notes.join(" · ");
        head.draw(&Text::new(
            notes,
            (20, 68),
            ("sans-serif", 13)
                .into_font()
                .color(&RGBColor(0x66, 0x66, 0x66)),
        ))
        .map_err(e)?;
    }
    // The legend: one swatch per run.
    let mut x = 20i32;
    for (i, r) in c.runs.iter().enumerate() {
        head.draw(&Rectangle::new([(x, 94), (x + 14, 108)], color(i).filled()))
            .map_err(e)?;
        head.draw(&Text::new(
            r.label.clone(),
            (x + 20, 93),
            ("sans-serif", 14).into_font(),
        ))
        .map_err(e)?;
        x += 40 + 8 * r.label.chars().count() as i32;
    }

    let areas = body.split_evenly((rows, cols));
    for (p, area) in panels.iter().zip(areas.iter()) {
        let top = p.bars.iter().map(|b| b.value).fold(0.0, f64::max);
        let top = if top > 0.0 { top * 1.18 } else { 1.0 };
        let n = p.bars.len() as f64;
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(6)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n, 0f64..top)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_labels(5)
            .y_label_formatter(&|v| fmt(*v))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .draw()
            .map_err(e)?;
        for (i, b) in p.bars.iter().enumerate() {
            let x0 = i as f64;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0 + 0.15, 0.0), (x0 + 0.85, b.value)],
                    b.color.filled(),
                )))
                .map_err(e)?;
            let text = b.label.clone().unwrap_or_else(|| fmt(b.value));
            let style = ("sans-serif", 13)
                .into_font()
                .into_text_style(area)
                .pos(Pos::new(HPos::Center, VPos::Bottom));
            chart
                .draw_series(std::iter::once(Text::new(
                    text,
                    (x0 + 0.5, b.value + top * 0.01),
                    style,
                )))
                .map_err(e)?;
        }
    }
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{tests::sample, COMPARE_SCHEMA};

    #[test]
    fn renders_every_scenario() {
        let r = sample();
        let mut d = r.clone();
        d.label = "direct".into();
        let c = Compare {
            schema: COMPARE_SCHEMA.into(),
            date: r.date.clone(),
            machine: r.machine.clone(),
            notes: vec!["quick run".into()],
            runs: vec![d, r],
        };
        assert_eq!(panels(&c).len(), 11);
        let dir = std::env::temp_dir().join(format!("halfpipe-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("c.svg");
        render(&c, &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("bulk upload") && svg.contains("quick run")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
