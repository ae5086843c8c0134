//! `DIR/loss.png`: the training loss (and eval loss points) against the step, the learning
//! rate on a second y axis. plotters draws into an RGB buffer with an embedded font (DejaVu
//! Sans, assets/fonts: no system font lookup, so it draws the same everywhere) and png
//! encodes it; the file is replaced atomically, so a viewer never reads half an image.

use crate::error::{Error, Result};
use crate::train::log::LogLine;
use plotters::prelude::*;
use std::path::Path;

pub const PLOT_FILE: &str = "loss.png";
const SIZE: (u32, u32) = (1000, 600);
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Registers the embedded font as plotters' "sans-serif" (once per process).
fn font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    match ok {
        true => Ok(()),
        false => Err(Error::Usage(
            "loss plot: the embedded font does not load".into(),
        )),
    }
}

/// Draws the lines of a log into `out` (a PNG).
pub fn loss_png(lines: &[LogLine], out: &Path) -> Result<()> {
    font()?;
    let (w, h) = SIZE;
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    draw(lines, &mut rgb).map_err(|e| Error::Usage(format!("loss plot: {e}")))?;
    let tmp = out.with_extension("png.tmp");
    encode(&rgb, &tmp).map_err(|e| Error::load(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

fn encode(rgb: &[u8], path: &Path) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(f, SIZE.0, SIZE.1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Best);
    enc.write_header()?.write_image_data(rgb)?;
    Ok(())
}

/// [lo, hi] of the finite values, widened so that a flat series still has a range.
fn range(values: impl Iterator<Item = f32>) -> (f32, f32) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 0.01).max(1e-6);
    (lo - pad, hi + pad)
}

fn draw(lines: &[LogLine], rgb: &mut [u8]) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(rgb, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let last = lines.iter().map(|l| l.step).max().unwrap_or(1).max(1) as f32;
    let evals: Vec<(f32, f32)> = lines
        .iter()
        .filter_map(|l| l.eval_loss.map(|e| (l.step as f32, e)))
        .collect();
    let losses = lines
        .iter()
        .map(|l| l.loss)
        .chain(evals.iter().map(|e| e.1));
    let (lo, hi) = range(losses);
    let lr_hi = range(lines.iter().map(|l| l.lr)).1.max(1e-12);
    let mut chart = ChartBuilder::on(&root)
        .caption("training loss", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .right_y_label_area_size(70)
        .build_cartesian_2d(0f32..last, lo..hi)?
        .set_secondary_coord(0f32..last, 0f32..lr_hi);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style(("sans-serif", 14))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("learning rate")
        .label_style(("sans-serif", 14))
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .draw()?;
    let train = lines.iter().map(|l| (l.step as f32, l.loss));
    chart
        .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))?
        .label("train loss")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    let eval = evals.iter().map(|&p| Circle::new(p, 4, RED.filled()));
    chart
        .draw_series(eval)?
        .label("eval loss")
        .legend(|(x, y)| Circle::new((x + 10, y), 4, RED.filled()));
    let lr = lines.iter().map(|l| (l.step as f32, l.lr));
    chart
        .draw_secondary_series(LineSeries::new(lr, GREEN.stroke_width(1)))?
        .label("learning rate")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN));
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
