//! `--plot FILE.svg`: throughput and CPU per GiB against rr message size, one
//! line per engine.

use std::path::Path;

use plotters::prelude::*;

use super::args::size_label;
use super::report::Results;
use super::workloads::{CaseKind, Metric};

const COLORS: [RGBColor; 8] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

type Series = Vec<(String, RGBColor, Vec<(f64, f64)>)>;

/// Median of `m` per rr size for every engine that has it.
fn series(r: &Results, m: Metric) -> Series {
    let mut out = Vec::new();
    for (ei, e) in r.engines.iter().enumerate() {
        let mut pts = Vec::new();
        for (ci, c) in r.cases.iter().enumerate() {
            if let CaseKind::Rr { size } = c.kind {
                if let Some(v) = r.median(ci, ei, m) {
                    pts.push((size as f64, v));
                }
            }
        }
        if !pts.is_empty() {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            out.push((e.label.clone(), COLORS[ei % COLORS.len()], pts));
        }
    }
    out
}

pub fn draw(r: &Results, path: &Path) -> Result<(), String> {
    let tput = series(r, Metric::Gbps);
    if tput.is_empty() {
        return Err("--plot needs the rr workload (throughput by message size)".into());
    }
    let cpu = series(r, Metric::CpuPerGib);
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(600);
    panel(
        &left,
        "rr throughput by message size",
        "GB/s (both directions)",
        &tput,
        false,
    )?;
    if cpu.is_empty() {
        right
            .draw_text(
                "no proxy CPU measured",
                &("sans-serif", 18).into_text_style(&right),
                (200, 220),
            )
            .map_err(|e| e.to_string())?;
    } else {
        panel(
            &right,
            "proxy CPU per GiB moved",
            "CPU s/GiB (log scale)",
            &cpu,
            true,
        )?;
    }
    root.present()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    ylabel: &str,
    data: &Series,
    log_y: bool,
) -> Result<(), String> {
    // A log y axis is drawn as log10 of the values on a linear axis.
    let data: Series = data
        .iter()
        .map(|(l, c, pts)| {
            let pts = pts
                .iter()
                .filter(|p| !log_y || p.1 > 0.0)
                .map(|&(x, y)| (x, if log_y { y.log10() } else { y }))
                .collect();
            (l.clone(), *c, pts)
        })
        .collect();
    let ys = data.iter().flat_map(|s| s.2.iter().map(|p| p.1));
    let (ymin, ymax) = if log_y {
        let lo = ys.clone().fold(f64::INFINITY, f64::min);
        let hi = ys.fold(f64::NEG_INFINITY, f64::max);
        ((lo - 0.2).floor(), (hi + 0.2).ceil().max(lo + 1.0))
    } else {
        (0.0, ys.fold(0.0, f64::max).max(1e-6) * 1.15)
    };
    let xs = data.iter().flat_map(|s| s.2.iter().map(|p| p.0));
    let xmin = xs.clone().fold(f64::INFINITY, f64::min);
    let xmax = xs.fold(0.0, f64::max).max(xmin * 2.0);
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d((xmin / 1.5..xmax * 1.5).log_scale(), ymin..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("message size")
        .y_desc(ylabel)
        .x_label_formatter(&|v| size_label(v.round() as usize))
        .y_label_formatter(&|v| {
            if log_y {
                let x = 10f64.powf(*v);
                format!(
                    "{x:.*}",
                    if x >= 1.0 {
                        0
                    } else {
                        (-x.log10()).ceil() as usize
                    }
                )
            } else {
                format!("{v:.2}")
            }
        })
        .draw()
        .map_err(err)?;
    for (label, color, pts) in &data {
        let c = *color;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(PointSeries::of_element(
                pts.iter().copied(),
                4,
                c.filled(),
                &|coord, size, style| EmptyElement::at(coord) + Circle::new((0, 0), size, style),
            ))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(err)?;
    Ok(())
}
