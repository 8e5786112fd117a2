//! Rasterizer values against hand-computed expectations: one Gaussian facing the camera,
//! occlusion order, culling, and input errors.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gen_scene::splat::{render, RenderConfig, Splats};
use gen_scene::{Camera, Intrinsics};
use glam::{DMat3, DVec3};

const C0: f64 = 0.282_094_791_773_878_14;

fn cam32() -> Camera {
    let k = Intrinsics { fx: 40.0, fy: 40.0, cx: 16.0, cy: 16.0, width: 32, height: 32 };
    // Identity rotation: world = camera frame shifted so the origin is 5 units in front.
    Camera::new(k, DMat3::IDENTITY, DVec3::new(0.0, 0.0, 5.0)).unwrap()
}

fn splats(means: &[[f64; 3]], log_scale: &[f64], logits: &[f64], dc: &[[f64; 3]]) -> Splats {
    let n = means.len();
    let d = Device::Cpu;
    Splats {
        means: Tensor::from_vec(means.concat(), (n, 3), &d).unwrap(),
        log_scales: Tensor::from_vec(
            log_scale.iter().flat_map(|&s| [s; 3]).collect::<Vec<_>>(),
            (n, 3),
            &d,
        )
        .unwrap(),
        quats: Tensor::from_vec([1.0, 0.0, 0.0, 0.0].repeat(n), (n, 4), &d).unwrap(),
        opacity_logits: Tensor::from_vec(logits.to_vec(), n, &d).unwrap(),
        sh: Tensor::from_vec(dc.concat(), (n, 1, 3), &d).unwrap(),
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn single_gaussian_matches_hand_computation() -> Result<()> {
    let s = 0.25f64;
    let logit = 0.7;
    let dc = [0.4, -0.2, 0.1];
    let sp = splats(&[[0.0, 0.0, 0.0]], &[s.ln()], &[logit], &[dc]);
    let bg = [0.1, 0.2, 0.3];
    let out = render(&sp, &cam32(), &RenderConfig { background: bg })?;
    // Pixel std: fx * s / z = 2 px; variance 4 + 0.3 low-pass; mean at (16, 16).
    let var = (40.0 * s / 5.0f64).powi(2) + 0.3;
    assert_eq!(out.radii()?.to_vec1::<f64>()?, vec![(3.0 * var.sqrt()).ceil()]);
    let rgb = out.rgb.to_vec3::<f64>()?;
    let alpha = out.alpha.to_vec2::<f64>()?;
    let depth = out.depth.to_vec2::<f64>()?;
    let mut checked = 0;
    for (row, col) in [(16usize, 17usize), (15, 15), (16, 20), (10, 16), (0, 0)] {
        let (dx, dy) = (col as f64 + 0.5 - 16.0, row as f64 + 0.5 - 16.0);
        let mut a = sigmoid(logit) * (-0.5 * (dx * dx + dy * dy) / var).exp();
        // Pixels outside the 3-sigma tile cover or under 1/255 get nothing.
        if a < 1.0 / 255.0 {
            a = 0.0;
        }
        for ch in 0..3 {
            let want = a * (0.5 + C0 * dc[ch]) + (1.0 - a) * bg[ch];
            assert!(
                (rgb[row][col][ch] - want).abs() < 1e-12,
                "pixel ({row},{col}) ch {ch}: {} vs {want}",
                rgb[row][col][ch]
            );
        }
        assert!((alpha[row][col] - a).abs() < 1e-12);
        assert!((depth[row][col] - a * 5.0).abs() < 1e-12);
        checked += (a > 0.0) as usize;
    }
    assert_eq!(checked, 4);
    Ok(())
}

#[test]
fn nearer_gaussian_occludes_farther_one_whatever_the_order() -> Result<()> {
    let red = [2.0, -1.7, -1.7];
    let green = [-1.7, 2.0, -1.7];
    let near = [0.0, 0.0, -2.0]; // depth 3
    let far = [0.0, 0.0, 1.0]; // depth 6
    let bg = [0.0, 0.0, 1.0];
    let cfg = RenderConfig { background: bg };
    let a =
        render(&splats(&[near, far], &[-1.0, -0.5], &[8.0, 8.0], &[red, green]), &cam32(), &cfg)?;
    let b =
        render(&splats(&[far, near], &[-0.5, -1.0], &[8.0, 8.0], &[green, red]), &cam32(), &cfg)?;
    assert_eq!(a.rgb.flatten_all()?.to_vec1::<f64>()?, b.rgb.flatten_all()?.to_vec1::<f64>()?);
    let px = a.rgb.get(16)?.get(16)?.to_vec1::<f64>()?;
    // Centre pixel (offset 0.5, 0.5 from both means): alpha of each layer from its own variance.
    let al = |z: f64, ls: f64| -> f64 {
        let var = (40.0 * f64::exp(ls) / z).powi(2) + 0.3;
        (sigmoid(8.0) * (-0.5 * 0.5 / var).exp()).min(0.99)
    };
    let (a1, a2) = (al(3.0, -1.0), al(6.0, -0.5));
    for ch in 0..3 {
        let c1 = (0.5 + C0 * red[ch]).max(0.0);
        let c2 = (0.5 + C0 * green[ch]).max(0.0);
        let want = a1 * c1 + (1.0 - a1) * a2 * c2 + (1.0 - a1) * (1.0 - a2) * bg[ch];
        assert!((px[ch] - want).abs() < 1e-12, "ch {ch}: {} vs {want}", px[ch]);
    }
    assert!(px[0] > 0.5 && px[1] < 0.1, "the near red splat must dominate: {px:?}");
    Ok(())
}

#[test]
fn culled_gaussians_render_background_and_get_zero_gradients() -> Result<()> {
    // Behind the camera, and far off to the side.
    let sp = splats(
        &[[0.0, 0.0, -6.0], [100.0, 0.0, 0.0]],
        &[-1.0, -1.0],
        &[2.0, 2.0],
        &[[0.3; 3], [0.3; 3]],
    );
    let means = Var::from_tensor(&sp.means)?;
    let sp = Splats { means: means.as_tensor().clone(), ..sp };
    let bg = [0.25, 0.5, 0.75];
    let out = render(&sp, &cam32(), &RenderConfig { background: bg })?;
    assert_eq!(out.radii()?.to_vec1::<f64>()?, vec![0.0, 0.0]);
    let rgb = out.rgb.flatten_all()?.to_vec1::<f64>()?;
    assert!(rgb.chunks(3).all(|p| p == bg));
    let g = out.rgb.sum_all()?.backward()?;
    let gm = g.get(&means).expect("means gradient").flatten_all()?.to_vec1::<f64>()?;
    assert!(gm.iter().all(|&v| v == 0.0));
    Ok(())
}

#[test]
fn output_layouts() -> Result<()> {
    let sp = splats(&[[0.0, 0.0, 0.0]], &[-1.0], &[1.0], &[[0.1, 0.2, 0.3]]);
    let out = render(&sp, &cam32(), &RenderConfig::default())?;
    assert_eq!(out.rgb.dims(), &[32, 32, 3]);
    assert_eq!(out.alpha.dims(), &[32, 32]);
    assert_eq!(out.depth.dims(), &[32, 32]);
    assert_eq!(out.projection.dims(), &[1, 8]);
    let chw = out.rgb_chw()?;
    assert_eq!(chw.dims(), &[3, 32, 32]);
    assert_eq!(
        chw.get(1)?.get(16)?.get(16)?.to_scalar::<f64>()?,
        out.rgb.get(16)?.get(16)?.get(1)?.to_scalar::<f64>()?
    );
    Ok(())
}

#[test]
fn bad_inputs_are_clear_errors() {
    let good = splats(&[[0.0, 0.0, 0.0]], &[-1.0], &[1.0], &[[0.1, 0.2, 0.3]]);
    let cam = cam32();
    let cfg = RenderConfig::default();
    let err = |s: Splats| render(&s, &cam, &cfg).err().map(|e| e.to_string()).unwrap_or_default();
    let d = Device::Cpu;
    let e = err(Splats { quats: Tensor::zeros((1, 3), DType::F64, &d).unwrap(), ..good.clone() });
    assert!(e.contains("quats") && e.contains("[1, 4]"), "{e}");
    let e = err(Splats { sh: Tensor::zeros((1, 5, 3), DType::F64, &d).unwrap(), ..good.clone() });
    assert!(e.contains("5 coefficients"), "{e}");
    let e =
        err(Splats { opacity_logits: Tensor::zeros(1, DType::F32, &d).unwrap(), ..good.clone() });
    assert!(e.contains("opacity_logits") && e.contains("F32"), "{e}");
    let e = err(Splats { means: good.means.to_dtype(DType::F16).unwrap(), ..good.clone() });
    assert!(e.contains("F16"), "{e}");
}

#[test]
fn compositing_stops_before_transmittance_drops_below_1e4() -> Result<()> {
    // Five large splats on the optical axis at depths 3..7, alpha ≈ 0.95 each at the centre
    // pixel: T goes 0.05, 2.5e-3, 1.25e-4, then 6e-6 < 1e-4, so only the first three count.
    let means: Vec<[f64; 3]> = (0..5).map(|i| [0.0, 0.0, -2.0 + i as f64]).collect();
    let logit = (0.95f64 / 0.05).ln() + 0.01;
    let dcs =
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]];
    let sp = splats(&means, &[0.5; 5], &[logit; 5], &dcs);
    let out = render(&sp, &cam32(), &RenderConfig { background: [0.3, 0.3, 0.3] })?;
    let px = out.rgb.get(16)?.get(16)?.to_vec1::<f64>()?;
    let mut t = 1.0;
    let mut want = [0.0; 3];
    let mut layers = 0;
    for (i, dc) in dcs.iter().enumerate() {
        let z = 3.0 + i as f64;
        let var = (40.0 * 0.5f64.exp() / z).powi(2) + 0.3;
        let a = (sigmoid(logit) * (-0.5 * 0.5 / var).exp()).min(0.99);
        if t * (1.0 - a) < 1e-4 {
            break;
        }
        for ch in 0..3 {
            want[ch] += t * a * (0.5 + C0 * dc[ch]);
        }
        t *= 1.0 - a;
        layers += 1;
    }
    assert_eq!(layers, 3);
    for ch in 0..3 {
        want[ch] += t * 0.3;
        assert!((px[ch] - want[ch]).abs() < 1e-12, "ch {ch}: {} vs {}", px[ch], want[ch]);
    }
    let alpha = out.alpha.get(16)?.get(16)?.to_scalar::<f64>()?;
    assert!((1.0 - alpha - t).abs() < 1e-15 && t > 1e-4 && t < 2e-4);
    Ok(())
}

#[test]
fn degenerate_parameters_are_culled_without_panics() -> Result<()> {
    let good = [0.0, 0.0, 0.0];
    let sp = splats(
        &[good, [f64::NAN, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -4.995]],
        &[-1.0, -1.0, 400.0, -1.0],
        &[1.0; 4],
        &[[0.2, 0.1, 0.0]; 4],
    );
    // A zero quaternion on the first splat is treated as the identity rotation.
    let q = Tensor::from_vec(
        vec![0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        (4, 4),
        &Device::Cpu,
    )?;
    let means = Var::from_tensor(&sp.means)?;
    let sp = Splats { quats: q, means: means.as_tensor().clone(), ..sp };
    let out = render(&sp, &cam32(), &RenderConfig::default())?;
    let radii = out.radii()?.to_vec1::<f64>()?;
    // NaN mean, infinite scale and a splat on the near plane (depth 0.005) are culled.
    assert!(radii[0] > 0.0 && radii[1..] == [0.0, 0.0, 0.0], "{radii:?}");
    assert!(out.rgb.flatten_all()?.to_vec1::<f64>()?.iter().all(|v| v.is_finite()));
    let g = out
        .rgb
        .sum_all()?
        .backward()?
        .get(&means)
        .expect("gradient")
        .flatten_all()?
        .to_vec1::<f64>()?;
    assert!(g.iter().all(|v| v.is_finite()) && g[3..].iter().all(|&v| v == 0.0));
    Ok(())
}
