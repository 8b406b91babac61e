//! SVG charts of a harness run, written next to docs/benchmarks.md and
//! embedded in its generated section (plotters, SVG backend: no fonts or
//! bitmaps needed; the text is left to the viewer's sans-serif font).
//!
//! - `xqemu.svg`: IOPS of each hastd mode relative to qemu-nbd, per
//!   workload;
//! - `latency.svg`: p50 and p99 completion latency of each system, one
//!   panel per workload (logarithmic);
//! - `sync.svg`: the full synchronisation's rate over time with the
//!   application load (and alone), and the application's IOPS during it.
//!
//! The data preparation is pure and unit-tested; [`write_all`] renders and
//! writes.

use std::ops::Range;
use std::path::Path;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::{CoordTranslate, Shift};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{ChartRef, Results, SyncTimeline, QEMU, RAW, SYNC_IDLE};

/// Grouped bars: one group per x label, one bar per series in each.
#[derive(Debug, Clone, PartialEq)]
pub struct Bars {
    /// The x labels (workloads).
    pub groups: Vec<String>,
    /// (series name, one value per group).
    pub series: Vec<(String, Vec<Option<f64>>)>,
}

/// IOPS of each hastd mode relative to qemu-nbd, per workload (rows
/// compared with qemu-nbd only, in the order of the run).
pub fn ratio_bars(res: &Results) -> Bars {
    let mut groups: Vec<(String, String)> = Vec::new();
    let mut systems: Vec<String> = Vec::new();
    for r in &res.rows {
        if !r.system.starts_with("hastd ") || res.ratio(r, QEMU).is_none() {
            continue;
        }
        if !groups.iter().any(|(k, _)| *k == r.workload) {
            groups.push((r.workload.clone(), r.label.clone()));
        }
        if !systems.contains(&r.system) {
            systems.push(r.system.clone());
        }
    }
    let series = systems
        .iter()
        .map(|s| {
            let v = groups
                .iter()
                .map(|(k, _)| res.row(s, k).and_then(|r| res.ratio(r, QEMU)))
                .collect();
            (s.trim_start_matches("hastd ").to_owned(), v)
        })
        .collect();
    Bars {
        groups: groups.into_iter().map(|(_, l)| l).collect(),
        series,
    }
}

/// The latencies of one workload on every system.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyPanel {
    /// Workload label.
    pub workload: String,
    /// (system, p50 µs, p99 µs), in the order of the run.
    pub bars: Vec<(String, f64, f64)>,
}

/// p50 and p99 per system, one panel per workload measured on more than
/// one system (the rows compared across systems).
pub fn latency_panels(res: &Results) -> Vec<LatencyPanel> {
    let mut panels: Vec<(String, LatencyPanel)> = Vec::new();
    for r in res.rows.iter().filter(|r| r.compare) {
        let i = match panels.iter().position(|(k, _)| *k == r.workload) {
            Some(i) => i,
            None => {
                panels.push((
                    r.workload.clone(),
                    LatencyPanel {
                        workload: r.label.clone(),
                        bars: Vec::new(),
                    },
                ));
                panels.len() - 1
            }
        };
        let name = match r.system.as_str() {
            RAW => "raw".to_owned(),
            s => s.trim_start_matches("hastd ").to_owned(),
        };
        panels[i].1.bars.push((name, r.fio.p50_us, r.fio.p99_us));
    }
    panels
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| p.bars.len() > 1)
        .collect()
}

/// Rates from cumulative (seconds, bytes) samples: MB/s over steps of at
/// least `min_dt` seconds, placed at the end of each step.
pub fn rates(samples: &[(f64, u64)], min_dt: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let Some(&(mut t0, mut b0)) = samples.first() else {
        return out;
    };
    out.push((t0, 0.0));
    for (i, &(t, b)) in samples.iter().enumerate().skip(1) {
        let dt = t - t0;
        // The last step may be shorter.
        if dt >= min_dt || (i == samples.len() - 1 && dt > 0.0) {
            out.push((t, b.saturating_sub(b0) as f64 / 1e6 / dt));
            (t0, b0) = (t, b);
        }
    }
    out
}

/// The series of the sync chart.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncSeries {
    /// Sync MB/s with the application load.
    pub loaded: Vec<(f64, f64)>,
    /// Sync MB/s alone.
    pub alone: Vec<(f64, f64)>,
    /// Application IOPS during the loaded sync.
    pub app_iops: Vec<(f64, f64)>,
    /// Application IOPS with no sync (the same load afterwards), if known.
    pub app_idle_iops: Option<f64>,
}

/// Sync rates over half-second steps (fio's IOPS log interval), the
/// application's IOPS as logged.
pub fn sync_series(t: &SyncTimeline, app_idle_iops: Option<f64>) -> SyncSeries {
    SyncSeries {
        loaded: rates(&t.loaded, 0.5),
        alone: rates(&t.alone, 0.5),
        app_iops: t.app_iops.clone(),
        app_idle_iops,
    }
}

/// An x axis of `n` groups: group `i` spans `[i, i + 1)`, its key point
/// (where its label goes) is its middle.
#[derive(Debug, Clone, Copy)]
struct GroupAxis(usize);

impl Ranged for GroupAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let span = f64::from(limit.1 - limit.0);
        limit.0 + (v / self.0.max(1) as f64 * span).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, _hint: H) -> Vec<f64> {
        (0..self.0).map(|i| i as f64 + 0.5).collect()
    }

    fn range(&self) -> Range<f64> {
        0.0..self.0 as f64
    }
}

/// The label of the group whose key point is `x`.
fn group_label(groups: &[String], x: f64) -> String {
    groups
        .get(x.floor().max(0.0) as usize)
        .cloned()
        .unwrap_or_default()
}

/// The colour of series `i`.
fn colour(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    C[i % C.len()]
}

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("chart: {e:?}")
}

/// An SVG of `size` pixels on a white background, drawn by `draw`.
fn svg_chart(size: (u32, u32), draw: impl FnOnce(&SvgArea) -> Res<()>) -> Res<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        draw(&root)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

type SvgArea<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// The legend of a chart's labelled series, at `pos`.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    pos: SeriesLabelPosition,
) -> Res<()> {
    chart
        .configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

/// Grouped bars of `data` as SVG, with a reference line at `reference`.
pub fn render_bars(
    data: &Bars,
    title: &str,
    y_desc: &str,
    reference: Option<(f64, &str)>,
) -> Res<String> {
    svg_chart((960, 480), |root| {
        let top = data
            .series
            .iter()
            .flat_map(|(_, v)| v.iter().flatten())
            .copied()
            .chain(reference.map(|r| r.0))
            .fold(0.0f64, f64::max);
        let n = data.groups.len();
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(GroupAxis(n), 0.0..(top * 1.3).max(0.1))
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|x| group_label(&data.groups, *x))
            .y_desc(y_desc)
            .y_label_formatter(&|y| format!("{y:.1}"))
            .draw()
            .map_err(err)?;
        let k = data.series.len().max(1) as f64;
        let width = 0.8 / k;
        for (j, (name, values)) in data.series.iter().enumerate() {
            let c = colour(j);
            let bars = values.iter().enumerate().filter_map(|(i, v)| {
                let x0 = i as f64 + 0.1 + j as f64 * width;
                v.map(|v| Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], c.filled()))
            });
            chart
                .draw_series(bars)
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
            let labels = values.iter().enumerate().filter_map(|(i, v)| {
                let x = i as f64 + 0.1 + (j as f64 + 0.46) * width;
                v.map(|v| {
                    Text::new(
                        format!("{v:.2}"),
                        (x, v),
                        ("sans-serif", 11)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )
                })
            });
            chart.draw_series(labels).map_err(err)?;
        }
        if let Some((y, name)) = reference {
            chart
                .draw_series(LineSeries::new(
                    [(0.0, y), (n as f64, y)],
                    BLACK.stroke_width(1),
                ))
                .map_err(err)?
                .label(name)
                .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK));
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}

/// p50 and p99 bars per system, one panel per workload, logarithmic.
pub fn render_latency(panels: &[LatencyPanel]) -> Res<String> {
    let cols = 2;
    let rows = panels.len().div_ceil(cols).max(1);
    svg_chart((1000, 40 + 300 * rows as u32), |root| {
        let root = root
            .titled(
                "Completion latency, p50 and p99 (µs, logarithmic)",
                ("sans-serif", 20),
            )
            .map_err(err)?;
        let areas = root.split_evenly((rows, cols));
        let (lo, hi) = panels
            .iter()
            .flat_map(|p| p.bars.iter().flat_map(|b| [b.1, b.2]))
            .filter(|v| *v > 0.0)
            .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (lo, hi) = if hi > 0.0 {
            (lo / 2.0, hi * 2.0)
        } else {
            (1.0, 10.0)
        };
        for (p, area) in panels.iter().zip(areas.iter()) {
            let groups: Vec<String> = p.bars.iter().map(|b| b.0.clone()).collect();
            let mut chart = ChartBuilder::on(area)
                .caption(&p.workload, ("sans-serif", 15))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(52)
                .build_cartesian_2d(GroupAxis(groups.len()), (lo..hi).log_scale())
                .map_err(err)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_label_formatter(&|x| group_label(&groups, *x))
                .y_label_formatter(&|y| format!("{y:.0}"))
                .draw()
                .map_err(err)?;
            for (j, name) in ["p50", "p99"].into_iter().enumerate() {
                let c = colour(j);
                let bars = p
                    .bars
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.1 > 0.0)
                    .map(|(i, b)| {
                        let v = if j == 0 { b.1 } else { b.2 };
                        let x0 = i as f64 + 0.15 + j as f64 * 0.35;
                        Rectangle::new([(x0, lo), (x0 + 0.33, v.max(lo))], c.filled())
                    });
                let s = chart.draw_series(bars).map_err(err)?;
                if std::ptr::eq(p, &panels[0]) {
                    s.label(name).legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled())
                    });
                }
            }
            if std::ptr::eq(p, &panels[0]) {
                legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
            }
        }
        Ok(())
    })
}

/// Sync MB/s (left axis) and application IOPS (right axis) over time.
pub fn render_sync(s: &SyncSeries, title: &str) -> Res<String> {
    svg_chart((960, 480), |root| {
        let max = |v: &mut dyn Iterator<Item = f64>| v.fold(1.0f64, f64::max);
        let sync = || s.loaded.iter().chain(&s.alone);
        let t_end = max(&mut sync().chain(&s.app_iops).map(|p| p.0));
        let mb_top = max(&mut sync().map(|p| p.1));
        let iops_top = max(&mut s.app_iops.iter().map(|p| p.1).chain(s.app_idle_iops));
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .right_y_label_area_size(64)
            .build_cartesian_2d(0.0..t_end, 0.0..mb_top * 1.3)
            .map_err(err)?
            .set_secondary_coord(0.0..t_end, 0.0..iops_top * 1.3);
        chart
            .configure_mesh()
            .x_desc("seconds since the secondary connected")
            .y_desc("sync MB/s")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(err)?;
        chart
            .configure_secondary_axes()
            .y_desc("application IOPS")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(err)?;
        let (c0, c1) = (colour(0), colour(1));
        let idle: Vec<(f64, f64)> = s
            .app_idle_iops
            .map_or_else(Vec::new, |i| vec![(0.0, i), (t_end, i)]);
        // (points, on the right axis, dashed, colour, label)
        let lines = [
            (
                &s.loaded,
                false,
                false,
                c0,
                "sync with the application load (MB/s)",
            ),
            (&s.alone, false, true, c0, "sync alone (MB/s)"),
            (
                &s.app_iops,
                true,
                false,
                c1,
                "application IOPS during the sync (right)",
            ),
            (
                &idle,
                true,
                true,
                c1,
                "application IOPS with no sync (right)",
            ),
        ];
        for (points, right, dashed, c, name) in lines {
            if points.is_empty() {
                continue;
            }
            let (style, gap) = if dashed {
                (c.mix(0.6).stroke_width(2), 4)
            } else {
                (c.stroke_width(2), 0)
            };
            let line = DashedLineSeries::new(points.iter().copied(), 6, gap, style);
            let drawn = if right {
                chart.draw_secondary_series(line)
            } else {
                chart.draw_series(line)
            };
            drawn
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], style));
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}

/// Renders every chart the results have data for into `dir` (created),
/// returning them with links relative to `docs_dir` where `dir` is under
/// it.
pub fn write_all(res: &Results, dir: &Path, docs_dir: Option<&Path>) -> Res<Vec<ChartRef>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    let mut put = |file: &str, title: &str, svg: String| -> Res<()> {
        let path = dir.join(file);
        std::fs::write(&path, svg).map_err(|e| format!("write {}: {e}", path.display()))?;
        let link = docs_dir
            .and_then(|d| path.strip_prefix(d).ok())
            .map_or_else(|| path.display().to_string(), |p| p.display().to_string());
        out.push(ChartRef {
            title: title.into(),
            link,
        });
        Ok(())
    };
    let bars = ratio_bars(res);
    if !bars.groups.is_empty() {
        let title = "hastd IOPS relative to qemu-nbd (same workload, same run)";
        put(
            "xqemu.svg",
            title,
            render_bars(&bars, title, "× qemu-nbd IOPS", Some((1.0, "qemu-nbd")))?,
        )?;
    }
    let panels = latency_panels(res);
    if !panels.is_empty() {
        put(
            "latency.svg",
            "p50 and p99 latency per system and workload",
            render_latency(&panels)?,
        )?;
    }
    if let Some(s) = res.sync.as_ref().filter(|s| !s.timeline.loaded.is_empty()) {
        let idle = res
            .rows
            .iter()
            .find(|r| r.workload == SYNC_IDLE)
            .map(|r| r.fio.iops);
        let title = format!(
            "Full sync of {} ({}) with 4k randwrite QD{} on the export",
            crate::util::human_size(s.size),
            s.mode,
            s.load_qd
        );
        put(
            "sync.svg",
            &title,
            render_sync(&sync_series(&s.timeline, idle), &title)?,
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fio::{self, FioResult};
    use crate::report::{hastd, Row, BIG};

    fn row(system: &str, key: &str, label: &str, iops: f64, p50: f64, p99: f64) -> Row {
        Row {
            system: system.into(),
            workload: key.into(),
            label: label.into(),
            fio: FioResult {
                iops,
                p50_us: p50,
                p99_us: p99,
                ..Default::default()
            },
            usage: None,
            compare: true,
            counters: None,
            resources: 0,
        }
    }

    fn results() -> Results {
        let (q1, q32) = (fio::RANDWRITE_QD1, fio::RANDWRITE_QD32);
        Results {
            rows: vec![
                row(RAW, q1.key, q1.label, 30000.0, 20.0, 40.0),
                row(QEMU, q1.key, q1.label, 10000.0, 70.0, 120.0),
                row(QEMU, q32.key, q32.label, 20000.0, 800.0, 2000.0),
                row(&hastd("memsync"), q1.key, q1.label, 2000.0, 400.0, 600.0),
                row(
                    &hastd("memsync"),
                    q32.key,
                    q32.label,
                    30000.0,
                    900.0,
                    3000.0,
                ),
                row(
                    &hastd("fullsync"),
                    q32.key,
                    q32.label,
                    10000.0,
                    1000.0,
                    4000.0,
                ),
                row(
                    QEMU,
                    BIG,
                    "4k randwrite QD32, 8 GiB",
                    20000.0,
                    800.0,
                    2000.0,
                ),
                row(
                    &hastd("memsync"),
                    BIG,
                    "4k randwrite QD32, 8 GiB",
                    5000.0,
                    3000.0,
                    9000.0,
                ),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn ratio_bars_group_by_workload_and_mode() {
        let b = ratio_bars(&results());
        assert_eq!(
            b.groups,
            [
                "4k randwrite QD1",
                "4k randwrite QD32",
                "4k randwrite QD32, 8 GiB"
            ]
        );
        assert_eq!(
            b.series,
            vec![
                ("memsync".to_owned(), vec![Some(0.2), Some(1.5), Some(0.25)]),
                ("fullsync".to_owned(), vec![None, Some(0.5), None]),
            ]
        );
    }

    #[test]
    fn latency_panels_per_workload() {
        let p = latency_panels(&results());
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].workload, "4k randwrite QD1");
        assert_eq!(
            p[0].bars,
            vec![
                ("raw".to_owned(), 20.0, 40.0),
                ("qemu-nbd".to_owned(), 70.0, 120.0),
                ("memsync".to_owned(), 400.0, 600.0),
            ]
        );
    }

    #[test]
    fn rates_from_cumulative_bytes() {
        let s = [
            (0.0, 100),
            (0.5, 600_100),
            (1.0, 1_000_100),
            (2.5, 4_000_100),
        ];
        assert_eq!(rates(&s, 1.0), vec![(0.0, 0.0), (1.0, 1.0), (2.5, 2.0)]);
        let s = [(0.0, 0), (1.0, 1_000_000), (1.5, 2_000_000)];
        assert_eq!(rates(&s, 1.0), vec![(0.0, 0.0), (1.0, 1.0), (1.5, 2.0)]);
        assert!(rates(&[], 1.0).is_empty());
    }

    #[test]
    fn charts_render_as_svg() {
        let r = results();
        let bars = render_bars(&ratio_bars(&r), "t", "y", Some((1.0, "qemu-nbd"))).unwrap();
        assert!(bars.starts_with("<svg") && bars.contains("4k randwrite QD32, 8 GiB"));
        assert!(bars.contains("1.50") && bars.contains("memsync"));
        let lat = render_latency(&latency_panels(&r)).unwrap();
        assert!(lat.contains("<svg") && lat.contains("qemu-nbd"));
        let t = SyncTimeline {
            alone: vec![(0.0, 0), (1.0, 300_000_000), (2.0, 600_000_000)],
            loaded: vec![(0.0, 0), (1.0, 200_000_000), (2.0, 400_000_000)],
            app_iops: vec![(0.5, 9000.0), (1.0, 9500.0)],
        };
        let sync = render_sync(&sync_series(&t, Some(11000.0)), "sync").unwrap();
        assert!(sync.contains("<svg") && sync.contains("application IOPS"));
    }

    #[test]
    fn charts_are_written_with_relative_links() {
        let dir = crate::util::WorkDir::new("hast-bench-charts-test");
        let charts = dir.join("bench");
        let refs = write_all(&results(), &charts, Some(dir.path())).unwrap();
        let links: Vec<&str> = refs.iter().map(|c| c.link.as_str()).collect();
        assert_eq!(links, ["bench/xqemu.svg", "bench/latency.svg"]);
        assert!(charts.join("xqemu.svg").exists() && charts.join("latency.svg").exists());
    }
}
