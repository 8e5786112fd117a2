//! PNG charts drawn with the `image` crate. [`write_loss_curve`]: a loss curve: steps on x (linear, first to last logged
//! step), loss on y in log scale between the smallest and largest logged loss. Grey dots are the
//! per-step losses, the blue line a moving average (window: 1/50 of the steps); thin horizontal
//! lines mark powers of ten, dotted ones 2× and 5× them. No text (the numbers are in
//! `metrics.csv`). [`write_panels`]: metrics vs a parameter, one line per series, several panels,
//! labelled with a built-in pixel font (the guidance sweep of `gen eval guidance`).

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::{write_atomic, Error, Result};

const W: u32 = 640;
const H: u32 = 360;
const MARGIN: u32 = 20;

/// Writes the curve of `(step, loss)` points to `path` (atomically). Non-positive or non-finite
/// losses are skipped. `_title` is kept for callers' readability (no font is drawn).
pub fn write_loss_curve(path: &Path, _title: &str, points: &[(u64, f64)]) -> Result<()> {
    let pts: Vec<(u64, f64)> =
        points.iter().copied().filter(|(_, l)| l.is_finite() && *l > 0.0).collect();
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    if pts.len() >= 2 {
        let (s0, s1) = (pts[0].0 as f64, pts[pts.len() - 1].0 as f64);
        let lmin = pts.iter().map(|p| p.1.log10()).fold(f64::INFINITY, f64::min);
        let lmax = pts.iter().map(|p| p.1.log10()).fold(f64::NEG_INFINITY, f64::max);
        let (lmin, lmax) = if lmax - lmin < 1e-3 { (lmin - 0.5, lmax + 0.5) } else { (lmin, lmax) };
        let span_x = (s1 - s0).max(1.0);
        let to_px = |s: f64, l: f64| -> (i64, i64) {
            let x = MARGIN as f64 + (s - s0) / span_x * (W - 2 * MARGIN) as f64;
            let y = (H - MARGIN) as f64 - (l - lmin) / (lmax - lmin) * (H - 2 * MARGIN) as f64;
            (x.round() as i64, y.round() as i64)
        };
        // decade lines
        let mut d = lmin.floor() as i64;
        while (d as f64) <= lmax.ceil() {
            for (m, dotted) in [(1.0, false), (2.0, true), (5.0, true)] {
                let l = (d as f64) + f64::log10(m);
                if l >= lmin && l <= lmax {
                    let (_, y) = to_px(s0, l);
                    for x in MARGIN..W - MARGIN {
                        if !dotted || x % 4 == 0 {
                            put(&mut img, x as i64, y, Rgb([200, 200, 200]));
                        }
                    }
                }
            }
            d += 1;
        }
        // axes
        for x in MARGIN..W - MARGIN {
            put(&mut img, x as i64, (H - MARGIN) as i64, Rgb([0, 0, 0]));
        }
        for y in MARGIN..H - MARGIN {
            put(&mut img, MARGIN as i64, y as i64, Rgb([0, 0, 0]));
        }
        for &(s, l) in &pts {
            let (x, y) = to_px(s as f64, l.log10());
            put(&mut img, x, y, Rgb([170, 170, 170]));
        }
        let win = (pts.len() / 50).max(1);
        let mut prev: Option<(i64, i64)> = None;
        let mut acc = 0.0;
        for i in 0..pts.len() {
            acc += pts[i].1;
            if i >= win {
                acc -= pts[i - win].1;
            }
            let n = (i + 1).min(win) as f64;
            let p = to_px(pts[i].0 as f64, (acc / n).log10());
            if let Some(q) = prev {
                line(&mut img, q, p, Rgb([30, 80, 220]));
            }
            prev = Some(p);
        }
    }
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| Error::msg(format!("{}: encoding PNG: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, a: (i64, i64), b: (i64, i64), c: Rgb<u8>) {
    let n = (b.0 - a.0).abs().max((b.1 - a.1).abs()).max(1);
    for i in 0..=n {
        let x = a.0 + (b.0 - a.0) * i / n;
        let y = a.1 + (b.1 - a.1) * i / n;
        put(img, x, y, c);
        put(img, x, y + 1, c);
    }
}

// ---------------------------------------------------------------------------------------------
// Multi-panel line charts with text (the guidance sweep)
// ---------------------------------------------------------------------------------------------

/// One line of a panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub colour: [u8; 3],
    /// `(x, y)` points, drawn in x order; non-finite values are skipped.
    pub points: Vec<(f64, f64)>,
}

/// One panel: a title, lines sharing its axes, and an optional dashed horizontal reference line
/// (a baseline, or 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
    pub reference: Option<f64>,
    /// Fixed y range; the data's (with the reference) when `None`.
    pub y_range: Option<(f64, f64)>,
}

const PANEL_W: u32 = 320;
const PANEL_H: u32 = 280;
const HEADER_H: u32 = 36;

/// Writes `panels` in a grid of `cols` columns to `path` (PNG, atomically): the title and a
/// legend of the first panel's series at the top; in each panel its title, the y range at the
/// left, the x values of the points under the axis, points as small squares joined by lines,
/// the reference as a dashed grey line. Text uses a built-in 5×7 pixel font (upper case).
pub fn write_panels(path: &Path, title: &str, panels: &[Panel], cols: usize) -> Result<()> {
    if panels.is_empty() {
        return Err(Error::invalid("chart", "no panels"));
    }
    let cols = cols.clamp(1, panels.len());
    let rows = panels.len().div_ceil(cols);
    let (w, h) = (cols as u32 * PANEL_W, HEADER_H + rows as u32 * PANEL_H);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    text(&mut img, 10, 6, title, Rgb([0, 0, 0]), 2);
    let mut lx = 10i64;
    for s in &panels[0].series {
        let c = Rgb(s.colour);
        for dx in 0..14 {
            put(&mut img, lx + dx, 29, c);
            put(&mut img, lx + dx, 30, c);
        }
        lx += 18;
        lx = text(&mut img, lx, 26, &s.name, Rgb([0, 0, 0]), 1) + 16;
    }
    for (i, p) in panels.iter().enumerate() {
        let ox = (i % cols) as i64 * PANEL_W as i64;
        let oy = HEADER_H as i64 + (i / cols) as i64 * PANEL_H as i64;
        draw_panel(&mut img, ox, oy, p);
    }
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| Error::msg(format!("{}: encoding PNG: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// A short label for an axis value.
pub fn format_value(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

fn draw_panel(img: &mut RgbImage, ox: i64, oy: i64, p: &Panel) {
    let black = Rgb([0, 0, 0]);
    text(img, ox + 10, oy + 6, &p.title, black, 1);
    let (left, right, top, bottom) =
        (ox + 58, ox + PANEL_W as i64 - 14, oy + 24, oy + PANEL_H as i64 - 34);
    let pts: Vec<(f64, f64)> = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let xs: Vec<f64> = {
        let mut v: Vec<f64> = pts.iter().map(|p| p.0).collect();
        v.sort_by(f64::total_cmp);
        v.dedup();
        v
    };
    let (y0, y1) = match p.y_range {
        Some(r) => r,
        None => {
            let ys = pts.iter().map(|p| p.1).chain(p.reference);
            let lo = ys.clone().fold(f64::INFINITY, f64::min);
            let hi = ys.fold(f64::NEG_INFINITY, f64::max);
            if !lo.is_finite() {
                (0.0, 1.0)
            } else if hi - lo < 1e-12 {
                (lo - 0.5 * lo.abs().max(1e-3), hi + 0.5 * hi.abs().max(1e-3))
            } else {
                let pad = 0.05 * (hi - lo);
                // Non-negative data keeps a non-negative axis.
                (if lo >= 0.0 { (lo - pad).max(0.0) } else { lo - pad }, hi + pad)
            }
        }
    };
    // axes and y labels
    for x in left..=right {
        put(img, x, bottom, black);
    }
    for y in top..=bottom {
        put(img, left, y, black);
    }
    for (v, y) in [(y1, top), (0.5 * (y0 + y1), (top + bottom) / 2), (y0, bottom)] {
        let label = format_value(v);
        text(img, left - 6 - 6 * label.len() as i64, y - 3, &label, black, 1);
        for x in (left..=right).step_by(3) {
            put(img, x, y, Rgb([225, 225, 225]));
        }
    }
    if xs.is_empty() {
        text(img, left + 10, (top + bottom) / 2, "NO DATA", black, 1);
        return;
    }
    let (x0, x1) = (xs[0], xs[xs.len() - 1]);
    let span = if x1 - x0 < 1e-12 { 1.0 } else { x1 - x0 };
    let to_px = |x: f64, y: f64| -> (i64, i64) {
        let px = left as f64 + 8.0 + (x - x0) / span * (right - left - 16) as f64;
        let py = bottom as f64 - (y - y0) / (y1 - y0) * (bottom - top) as f64;
        (px.round() as i64, py.round().clamp(top as f64 - 2.0, bottom as f64 + 2.0) as i64)
    };
    // x ticks and labels (skipping labels that would overlap)
    let mut last_end = i64::MIN;
    for &x in &xs {
        let (px, _) = to_px(x, y0);
        for d in 0..4 {
            put(img, px, bottom + d, black);
        }
        let label = format_value(x);
        let start = px - 3 * label.len() as i64;
        if start > last_end + 3 {
            last_end = text(img, start, bottom + 7, &label, black, 1);
        }
    }
    text(img, (left + right) / 2 - 15, bottom + 19, "SCALE", Rgb([90, 90, 90]), 1);
    if let Some(r) = p.reference {
        let (_, py) = to_px(x0, r);
        for x in left..=right {
            if (x / 4) % 2 == 0 {
                put(img, x, py, Rgb([120, 120, 120]));
            }
        }
    }
    for s in &p.series {
        let c = Rgb(s.colour);
        let mut sp: Vec<(f64, f64)> =
            s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        sp.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in &sp {
            let q = to_px(x, y);
            if let Some(a) = prev {
                line(img, a, q, c);
            }
            for dy in -2..=2 {
                for dx in -2..=2 {
                    put(img, q.0 + dx, q.1 + dy, c);
                }
            }
            prev = Some(q);
        }
    }
}

/// Draws `s` (upper-cased; unknown characters as blanks) at `(x, y)` with pixel size `scale`;
/// returns the x just after the text.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>, scale: i64) -> i64 {
    let mut cx = x;
    for ch in s.chars().flat_map(char::to_uppercase) {
        if let Some(rows) = glyph(ch) {
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                put(img, cx + col * scale + dx, y + r as i64 * scale + dy, c);
                            }
                        }
                    }
                }
            }
        }
        cx += 6 * scale;
    }
    cx
}

/// 5×7 glyphs, one row per byte, bit 4 leftmost.
fn glyph(ch: char) -> Option<[u8; 7]> {
    Some(match ch {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        _ => return None,
    })
}
