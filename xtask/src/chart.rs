//! The benchmark chart (plotters, font embedded).

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

/// Bars of LoRA-over-frozen ratios per shape, with the 1.05x goal as a line.
pub fn draw(path: &Path, ratios: &[(String, f64)]) -> Result<()> {
    let _ =
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = ratios.iter().map(|(_, v)| *v).fold(1.2f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "LoRA fwd+bwd time / frozen layer fwd+bwd (ndarray backend)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((0..ratios.len()).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => ratios.get(*i).map(|(s, _)| s.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc("ratio (lower is better)")
        .draw()?;
    chart.draw_series(ratios.iter().enumerate().map(|(i, (_, v))| {
        let color = if *v <= 1.05 {
            RGBColor(40, 150, 60)
        } else {
            RGBColor(30, 90, 220)
        };
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *v),
            ],
            color.filled(),
        );
        bar.set_margin(0, 0, 30, 30);
        bar
    }))?;
    chart
        .draw_series(LineSeries::new(
            [
                (SegmentValue::Exact(0), 1.05),
                (SegmentValue::Exact(ratios.len()), 1.05),
            ],
            RED.stroke_width(2),
        ))?
        .label("goal 1.05x")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart.draw_series(ratios.iter().enumerate().map(|(i, (_, v))| {
        Text::new(
            format!("{v:.3}x"),
            (SegmentValue::CenterOf(i), *v + top * 0.02),
            ("sans-serif", 16),
        )
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
