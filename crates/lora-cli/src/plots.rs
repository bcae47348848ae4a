//! PNG charts with plotters (fonts embedded, so no system font is needed).

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result};
use plotters::prelude::*;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // Only fails on a corrupt font file, which the crate ships verified.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Training loss per step, log scale.
pub fn loss_curve(path: &Path, title: &str, losses: &[f64]) -> Result<()> {
    register_font();
    let lo = losses
        .iter()
        .copied()
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let hi = losses.iter().copied().fold(0.0f64, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo * 0.8, hi * 1.25)
    } else {
        (1e-6, 1.0)
    };
    lora::io::fs::with_atomic_path(path, |tmp| -> Result<()> {
        let root = BitMapBackend::new(tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(0..losses.len().max(1), (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("MSE loss (log)")
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()?;
        chart
            .draw_series(LineSeries::new(
                losses.iter().enumerate().map(|(i, v)| (i, v.max(lo))),
                BLUE.stroke_width(2),
            ))?
            .label("LoRA fine-tuning")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()?;
        Ok(())
    })
    .with_context(|| format!("writing {}", path.display()))
}

/// One named curve of a prediction chart.
pub struct Curve<'a> {
    /// Legend label.
    pub label: &'a str,
    /// y values at the shared x values.
    pub ys: &'a [f32],
    /// Line colour.
    pub color: RGBColor,
}

/// Several curves over the same x values.
pub fn predictions(path: &Path, title: &str, xs: &[f32], curves: &[Curve<'_>]) -> Result<()> {
    register_font();
    let (x0, x1) = (
        xs.first().copied().unwrap_or(0.0),
        xs.last().copied().unwrap_or(1.0),
    );
    let all = curves.iter().flat_map(|c| c.ys.iter().copied());
    let (y0, y1) = all.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let pad = 0.1 * (y1 - y0).max(1e-3);
    lora::io::fs::with_atomic_path(path, |tmp| -> Result<()> {
        let root = BitMapBackend::new(tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
        chart.configure_mesh().x_desc("x").y_desc("y").draw()?;
        for c in curves {
            let color = c.color;
            chart
                .draw_series(LineSeries::new(
                    xs.iter().copied().zip(c.ys.iter().copied()),
                    color.stroke_width(2),
                ))?
                .label(c.label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()?;
        Ok(())
    })
    .with_context(|| format!("writing {}", path.display()))
}
