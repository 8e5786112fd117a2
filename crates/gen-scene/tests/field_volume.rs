//! Volume renderer: analytic densities (constant cube, linear ramp) against closed-form
//! transmittance and depth, background compositing, and occupancy-grid skipping.

// Index loops mirror pixel and coordinate indices.
#![allow(clippy::needless_range_loop)]

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gen_core::SeededRng;
use gen_scene::field::{render_volume, Aabb, OccupancyGrid, RadianceField, VolumeConfig};
use gen_scene::{Camera, Intrinsics};
use glam::DVec3;

/// An analytic field: density and colour as plain functions of the point.
struct Analytic<F: Fn([f64; 3]) -> (f64, [f64; 3])>(F);

impl<F: Fn([f64; 3]) -> (f64, [f64; 3])> RadianceField for Analytic<F> {
    fn query(&self, points: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let p = points.to_vec2::<f64>()?;
        let (s, c): (Vec<f64>, Vec<[f64; 3]>) =
            p.iter().map(|q| (self.0)([q[0], q[1], q[2]])).unzip();
        let n = s.len();
        Ok((
            Tensor::from_vec(s, n, &Device::Cpu)?,
            Tensor::from_vec(c.concat(), (n, 3), &Device::Cpu)?,
        ))
    }
    fn dtype(&self) -> DType {
        DType::F64
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
}

fn camera(w: usize, h: usize, eye: [f64; 3]) -> Result<Camera> {
    let k = Intrinsics::from_fov_y(0.9, w, h)?;
    Ok(Camera::look_at(k, DVec3::from(eye), DVec3::ZERO, DVec3::Y)?)
}

/// Ray direction of pixel (i, j) with unit camera depth, and its intersection with the cube
/// `[-1/2, 1/2]³` in camera depth — computed here independently of the renderer.
fn chord(cam: &Camera, i: usize, j: usize) -> Option<(DVec3, f64, f64)> {
    let k = &cam.intrinsics;
    let dc = DVec3::new((j as f64 + 0.5 - k.cx) / k.fx, (i as f64 + 0.5 - k.cy) / k.fy, 1.0);
    let d = cam.rotation.transpose() * dc;
    let o = cam.position();
    let (mut lo, mut hi) = (f64::MIN, f64::MAX);
    for a in 0..3 {
        let (t1, t2) = ((-0.5 - o[a]) / d[a], (0.5 - o[a]) / d[a]);
        lo = lo.max(t1.min(t2));
        hi = hi.min(t1.max(t2));
    }
    (hi > lo).then_some((d, lo, hi))
}

#[test]
fn constant_cube_matches_beer_lambert() -> Result<()> {
    let sigma = 1.7;
    let col = [0.2, 0.5, 0.9];
    let bg = [1.0, 0.0, 0.3];
    let field = Analytic(move |_| (sigma, col));
    let cam = camera(12, 10, [1.3, 0.9, -2.2])?;
    let mut cfg = VolumeConfig::new(64, Aabb::cube(0.5));
    cfg.background = bg;
    let out = render_volume(&field, &cam, &cfg, None, None)?;
    let rgb = out.rgb.to_vec3::<f64>()?;
    let op = out.opacity.to_vec2::<f64>()?;
    let depth = out.depth.to_vec2::<f64>()?;
    let (mut hits, mut worst_t, mut worst_d) = (0, 0f64, 0f64);
    for i in 0..10 {
        for j in 0..12 {
            let Some((d, z0, z1)) = chord(&cam, i, j) else {
                assert_eq!(op[i][j], 0.0);
                assert_eq!(rgb[i][j], bg.to_vec());
                continue;
            };
            hits += 1;
            // Transmittance exp(-σ · length); σ per unit camera depth is σ|d|.
            let a = sigma * d.length();
            let len = z1 - z0;
            let t = (-a * len).exp();
            worst_t = worst_t.max((op[i][j] - (1.0 - t)).abs());
            for ch in 0..3 {
                let want = (1.0 - t) * col[ch] + t * bg[ch];
                assert!((rgb[i][j][ch] - want).abs() < 1e-12, "pixel ({i},{j}) channel {ch}");
            }
            // ∫ a e^{-a s} (z0 + s) ds over [0, len].
            let want_d = z0 * (1.0 - t) + 1.0 / a - t * (len + 1.0 / a);
            worst_d = worst_d.max((depth[i][j] - want_d).abs() / want_d);
        }
    }
    println!(
        "constant cube: {hits} rays, |opacity error| {worst_t:.1e}, depth rel. error {worst_d:.1e}"
    );
    assert!(hits > 15 && hits < 120, "{hits} rays hit: both hits and misses are needed");
    assert!(worst_t < 1e-12, "piecewise-constant quadrature of a constant density must be exact");
    assert!(worst_d < 2e-3, "depth error {worst_d} exceeds the midpoint-rule bound");
    Ok(())
}

#[test]
fn linear_density_ramp_matches_closed_form() -> Result<()> {
    // σ(p) = 2 + 1.5 x: the midpoint rule integrates it exactly, so opacity is exact.
    let field = Analytic(|p: [f64; 3]| (2.0 + 1.5 * p[0], [1.0, 1.0, 1.0]));
    let cam = camera(9, 9, [2.0, -0.4, -1.5])?;
    let out = render_volume(&field, &cam, &VolumeConfig::new(16, Aabb::cube(0.5)), None, None)?;
    let op = out.opacity.to_vec2::<f64>()?;
    let o = cam.position();
    let mut worst = 0f64;
    for i in 0..9 {
        for j in 0..9 {
            let Some((d, z0, z1)) = chord(&cam, i, j) else {
                continue;
            };
            // ∫ σ(o + z d) |d| dz = |d| [2(z1-z0) + 1.5 (o_x (z1-z0) + d_x (z1²-z0²)/2)].
            let tau = d.length()
                * (2.0 * (z1 - z0) + 1.5 * (o.x * (z1 - z0) + d.x * (z1 * z1 - z0 * z0) / 2.0));
            worst = worst.max((op[i][j] - (1.0 - (-tau).exp())).abs());
        }
    }
    assert!(worst < 1e-12, "opacity error {worst}");
    Ok(())
}

/// A coloured ball: σ = 12 inside radius 0.35 (offset from the centre), 0 outside.
fn ball() -> Analytic<impl Fn([f64; 3]) -> (f64, [f64; 3])> {
    Analytic(|p: [f64; 3]| {
        let q = [p[0] - 0.1, p[1] + 0.05, p[2]];
        let r2 = q.iter().map(|v| v * v).sum::<f64>();
        let s = if r2 < 0.35 * 0.35 { 12.0 } else { 0.0 };
        (s, [0.5 + p[0], 0.5 + p[1], 0.5 - p[2]])
    })
}

#[test]
fn occupancy_skipping_keeps_the_image() -> Result<()> {
    let field = ball();
    let bounds = Aabb::cube(0.5);
    let cam = camera(16, 16, [0.4, 0.8, -2.0])?;
    let mut cfg = VolumeConfig::new(32, bounds);
    cfg.background = [0.3, 0.3, 0.3];
    let mut grid = OccupancyGrid::full(bounds, 16)?;
    let frac = grid.update(&field, 0.01)?;
    assert!(frac > 0.05 && frac < 0.6, "occupied fraction {frac}");
    // Every cell containing density is marked (check on a fine lattice).
    for k in 0..40 {
        for j in 0..40 {
            for i in 0..40 {
                let p = [i, j, k].map(|v| -0.5 + (v as f64 + 0.5) / 40.0);
                if (field.0)(p).0 > 0.0 {
                    assert!(grid.is_occupied(p), "{p:?} has density but its cell is empty");
                }
            }
        }
    }
    let mut r1 = SeededRng::new(5);
    let mut r2 = SeededRng::new(5);
    let full = render_volume(&field, &cam, &cfg, None, Some(&mut r1))?;
    let skip = render_volume(&field, &cam, &cfg, Some(&grid), Some(&mut r2))?;
    assert_eq!(full.samples_evaluated, full.samples_total);
    assert_eq!(skip.samples_total, full.samples_total);
    assert!(
        (skip.samples_evaluated as f64) < 0.6 * full.samples_total as f64,
        "{} of {} samples evaluated",
        skip.samples_evaluated,
        skip.samples_total
    );
    let diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
    };
    let (dc, dop, dd) = (
        diff(&full.rgb, &skip.rgb)?,
        diff(&full.opacity, &skip.opacity)?,
        diff(&full.depth, &skip.depth)?,
    );
    assert!(
        dc < 1e-12 && dop < 1e-12 && dd < 1e-12,
        "skipping changed the image: {dc:e} {dop:e} {dd:e}"
    );
    let opmax = full.opacity.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    assert!(opmax > 0.9, "the ball must be visible (max opacity {opmax})");

    // A grid that misses part of the ball changes the image (the comparison above can fail).
    let mut partial = grid.clone();
    for (c, o) in partial.occupied.iter_mut().enumerate() {
        if c % 16 < 8 {
            *o = false;
        }
    }
    let cut = render_volume(&field, &cam, &cfg, Some(&partial), Some(&mut SeededRng::new(5)))?;
    assert!(diff(&full.rgb, &cut.rgb)? > 0.1);
    Ok(())
}

#[test]
fn rays_missing_the_box_show_the_background() -> Result<()> {
    let field = Analytic(|_| (5.0, [1.0, 0.0, 0.0]));
    // Camera looking away from the box.
    let k = Intrinsics::from_fov_y(0.5, 4, 4)?;
    let cam = Camera::look_at(k, DVec3::new(0.0, 0.0, -3.0), DVec3::new(0.0, 0.0, -6.0), DVec3::Y)?;
    let mut cfg = VolumeConfig::new(8, Aabb::cube(0.5));
    cfg.background = [0.1, 0.2, 0.3];
    let out = render_volume(&field, &cam, &cfg, None, None)?;
    assert_eq!(out.samples_total, 0);
    let rgb = out.rgb.to_vec3::<f64>()?;
    assert!(rgb.iter().flatten().all(|c| c == &vec![0.1, 0.2, 0.3]));
    assert!(
        render_volume(&field, &cam, &VolumeConfig::new(0, Aabb::cube(0.5)), None, None).is_err()
    );
    Ok(())
}
