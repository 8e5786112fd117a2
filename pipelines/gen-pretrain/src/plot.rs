//! A loss-curve PNG drawn with the `image` crate: steps on x (linear, first to last logged
//! step), loss on y in log scale between the smallest and largest logged loss. Grey dots are the
//! per-step losses, the blue line a moving average (window: 1/50 of the steps); thin horizontal
//! lines mark powers of ten, dotted ones 2× and 5× them. No text (the numbers are in
//! `metrics.csv`).

use std::path::Path;

use image::{Rgb, RgbImage};

use gen_core::{write_atomic, Error, Result};

const W: u32 = 640;
const H: u32 = 360;
const MARGIN: u32 = 20;

/// Writes the curve of `(step, loss)` points to `path` (atomically). Non-positive or non-finite
/// losses are skipped. `_title` is kept for callers' readability (no font is drawn).
pub fn write_loss_curve(path: &Path, _title: &str, points: &[(u64, f64)]) -> Result<()> {
    let pts: Vec<(u64, f64)> = points.iter().copied().filter(|(_, l)| l.is_finite() && *l > 0.0).collect();
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
