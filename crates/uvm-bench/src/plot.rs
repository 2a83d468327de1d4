//! The boot-phase plot: one horizontal bar for the floor and one for the controller's start,
//! each stacked by phase, drawn with plotters' bitmap backend into a PNG.
//!
//! Text is drawn from the 8×8 bitmap font of the `font8x8` crate, pixel by pixel: plotters'
//! own text needs a TrueType font (through fontconfig, or a font file registered for
//! `ab_glyph`), and the picture should not depend on what fonts a machine has.

use std::path::Path;

use plotters::prelude::*;

use super::phases::{Phases, PHASE_NAMES};
use super::BenchError;

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 340;
const LEFT: i32 = 110;
const RIGHT: i32 = 130;
const BAR_H: i32 = 60;
const FLOOR_Y: i32 = 70;
const START_Y: i32 = 150;
const AXIS_Y: i32 = 225;

/// One colour per phase, in [`PHASE_NAMES`] order.
const COLORS: [RGBColor; 6] = [
    RGBColor(0x8d, 0x99, 0xae),
    RGBColor(0xf4, 0xa2, 0x61),
    RGBColor(0x2a, 0x9d, 0x8f),
    RGBColor(0xe9, 0xc4, 0x6a),
    RGBColor(0xe7, 0x6f, 0x51),
    RGBColor(0x26, 0x46, 0x53),
];

/// Writes the plot of `floor` vs `start` (median phases) to `path` (a `.png`).
pub fn write_phase_plot(
    path: &Path,
    title: &str,
    floor: &Phases,
    start: &Phases,
) -> Result<(), BenchError> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    draw(&root, title, floor, start).map_err(|message| BenchError::Plot {
        path: path.to_owned(),
        message,
    })?;
    root.present().map_err(|e| BenchError::Plot {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw(root: &Area<'_>, title: &str, floor: &Phases, start: &Phases) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    text(root, (16, 16), title, 2, &BLACK)?;

    let longest = floor.total_ms.max(start.total_ms).max(1.0);
    let step = tick_step(longest);
    let x_max = (longest / step).ceil() * step;
    let plot_w = f64::from(i32::try_from(WIDTH).unwrap_or(i32::MAX) - LEFT - RIGHT);
    let x_of = |v: f64| LEFT + (v / x_max * plot_w).round() as i32;

    // Axis and ticks with labels (ms).
    let grey = RGBColor(0xcc, 0xcc, 0xcc);
    root.draw(&PathElement::new(
        vec![(LEFT, AXIS_Y), (x_of(x_max), AXIS_Y)],
        BLACK,
    ))
    .map_err(err)?;
    let ticks = (x_max / step).round() as i32;
    for i in 0..=ticks {
        let v = f64::from(i) * step;
        let x = x_of(v);
        root.draw(&PathElement::new(vec![(x, FLOOR_Y - 8), (x, AXIS_Y)], grey))
            .map_err(err)?;
        root.draw(&PathElement::new(vec![(x, AXIS_Y), (x, AXIS_Y + 5)], BLACK))
            .map_err(err)?;
        let label = format!("{v:.0}");
        let half = i32::try_from(label.len()).unwrap_or(0) * 4;
        text(root, (x - half, AXIS_Y + 9), &label, 1, &BLACK)?;
    }
    text(root, (x_of(x_max) + 24, AXIS_Y + 9), "ms", 1, &BLACK)?;

    for (label, phases, y) in [("floor", floor, FLOOR_Y), ("start", start, START_Y)] {
        text(root, (12, y + BAR_H / 2 - 8), label, 2, &BLACK)?;
        let mut at = 0.0;
        for (value, color) in phases.values().iter().zip(COLORS) {
            if *value <= 0.0 {
                continue;
            }
            let (x0, x1) = (x_of(at), x_of(at + value));
            if x1 > x0 {
                root.draw(&Rectangle::new([(x0, y), (x1, y + BAR_H)], color.filled()))
                    .map_err(err)?;
            }
            at += value;
        }
        let total = format!("{:.0} ms", phases.total_ms);
        text(root, (x_of(at) + 8, y + BAR_H / 2 - 8), &total, 2, &BLACK)?;
    }

    // Legend, two rows of three.
    for (i, (name, color)) in PHASE_NAMES.iter().zip(COLORS).enumerate() {
        let i = i32::try_from(i).unwrap_or(0);
        let (col, row) = (i % 3, i / 3);
        let x = LEFT + col * 300;
        let y = AXIS_Y + 50 + row * 30;
        root.draw(&Rectangle::new([(x, y), (x + 18, y + 18)], color.filled()))
            .map_err(err)?;
        text(root, (x + 26, y + 1), name, 2, &BLACK)?;
    }
    Ok(())
}

/// A "nice" tick step (1, 2 or 5 × 10ⁿ ms) giving at most 12 ticks up to `max`.
fn tick_step(max: f64) -> f64 {
    let mut step = 1.0;
    loop {
        for m in [1.0, 2.0, 5.0] {
            if max / (step * m) <= 12.0 {
                return step * m;
            }
        }
        step *= 10.0;
    }
}

/// Draws `s` at `pos` (top left) with the 8×8 font scaled by `scale`; non-ASCII as '?'.
fn text(
    root: &Area<'_>,
    pos: (i32, i32),
    s: &str,
    scale: i32,
    color: &RGBColor,
) -> Result<(), String> {
    for (i, c) in s.chars().enumerate() {
        let code = if c.is_ascii() {
            c as usize
        } else {
            '?' as usize
        };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        let x0 = pos.0 + i32::try_from(i).unwrap_or(0) * 8 * scale;
        for (row, bits) in glyph.iter().enumerate() {
            let y = pos.1 + i32::try_from(row).unwrap_or(0) * scale;
            for col in 0..8 {
                if bits & (1 << col) == 0 {
                    continue;
                }
                let x = x0 + col * scale;
                for (dx, dy) in (0..scale).flat_map(|dx| (0..scale).map(move |dy| (dx, dy))) {
                    root.draw_pixel((x + dx, y + dy), color)
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps_are_round_numbers() {
        assert_eq!(tick_step(1.0), 1.0);
        assert_eq!(tick_step(20.0), 2.0);
        assert_eq!(tick_step(1931.0), 200.0);
        assert_eq!(tick_step(2500.0), 500.0);
        assert_eq!(tick_step(12_000.0), 1000.0);
    }

    #[test]
    fn the_plot_is_a_png() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("phases.png");
        let p = crate::report::tests::sample_report().phases_start;
        write_phase_plot(&path, "boot phases", &p, &p).expect("plot");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }
}
