//! The benchmark chart (plotters, font embedded).

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

const COLORS: [RGBColor; 3] = [
    RGBColor(30, 90, 220),
    RGBColor(230, 120, 20),
    RGBColor(40, 150, 60),
];

/// Grouped bars: for each shape, LoRA-over-frozen fwd+bwd of every backend, with the
/// 1.05x goal as a line.
pub fn draw(path: &Path, groups: &[(String, Vec<(String, f64)>)]) -> Result<()> {
    let _ =
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    let mut backends: Vec<String> = groups
        .iter()
        .flat_map(|(_, v)| v.iter().map(|(b, _)| b.clone()))
        .collect();
    backends.sort();
    backends.dedup();
    let root = BitMapBackend::new(path, (960, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = groups
        .iter()
        .flat_map(|(_, v)| v.iter().map(|(_, r)| *r))
        .fold(1.2f64, f64::max)
        * 1.15;
    let n = groups.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "LoRA layer fwd+bwd time / frozen layer fwd+bwd (lower is better)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len().max(1))
        .x_label_formatter(&|v| {
            let i = v.round();
            if (v - i).abs() < 0.01 && i >= 0.0 {
                groups
                    .get(i as usize)
                    .map(|(s, _)| s.clone())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("ratio")
        .draw()?;
    let width = 0.8 / backends.len().max(1) as f64;
    for (bi, backend) in backends.iter().enumerate() {
        let color = COLORS[bi % COLORS.len()];
        let bars: Vec<(f64, f64)> = groups
            .iter()
            .enumerate()
            .filter_map(|(i, (_, v))| {
                v.iter()
                    .find(|(b, _)| b == backend)
                    .map(|(_, r)| (i as f64 - 0.4 + bi as f64 * width, *r))
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|&(x0, r)| {
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, r)], color.filled())
            }))?
            .label(backend.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        chart.draw_series(bars.iter().map(|&(x0, r)| {
            Text::new(
                format!("{r:.2}x"),
                (x0 + width * 0.15, r + top * 0.02),
                ("sans-serif", 15),
            )
        }))?;
    }
    chart
        .draw_series(LineSeries::new(
            [(0.0, 1.05), (n, 1.05)],
            RED.stroke_width(2),
        ))?
        .label("goal 1.05x")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
