//! SSIM from candle ops: values against a direct (loop) implementation of the 3DGS formula,
//! and its gradient against central finite differences.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gen_core::SeededRng;
use gen_scene::fit::ssim::{gaussian_window, ssim, Ssim};

/// SSIM by explicit 2D convolution with the 11×11 window (outer product of the 1D window,
/// written out independently here), zero padding, mean over everything. `a`, `b`: (H, W, C).
fn ssim_loops(a: &[f64], b: &[f64], h: usize, w: usize, c: usize) -> f64 {
    let sigma = 1.5f64;
    let mut g = [0f64; 11];
    for (i, v) in g.iter_mut().enumerate() {
        let x = i as f64 - 5.0;
        *v = (-x * x / (2.0 * sigma * sigma)).exp();
    }
    let s: f64 = g.iter().sum();
    g.iter_mut().for_each(|v| *v /= s);
    let at = |img: &[f64], y: isize, x: isize, ch: usize| -> f64 {
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
            0.0
        } else {
            img[(y as usize * w + x as usize) * c + ch]
        }
    };
    let conv = |f: &dyn Fn(isize, isize, usize) -> f64, y: usize, x: usize, ch: usize| -> f64 {
        let mut acc = 0.0;
        for (dy, gy) in g.iter().enumerate() {
            for (dx, gx) in g.iter().enumerate() {
                acc += gy * gx * f(y as isize + dy as isize - 5, x as isize + dx as isize - 5, ch);
            }
        }
        acc
    };
    let (c1, c2) = (1e-4, 9e-4);
    let mut total = 0.0;
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let m1 = conv(&|yy, xx, k| at(a, yy, xx, k), y, x, ch);
                let m2 = conv(&|yy, xx, k| at(b, yy, xx, k), y, x, ch);
                let s11 = conv(&|yy, xx, k| at(a, yy, xx, k).powi(2), y, x, ch) - m1 * m1;
                let s22 = conv(&|yy, xx, k| at(b, yy, xx, k).powi(2), y, x, ch) - m2 * m2;
                let s12 =
                    conv(&|yy, xx, k| at(a, yy, xx, k) * at(b, yy, xx, k), y, x, ch) - m1 * m2;
                total += ((2.0 * m1 * m2 + c1) * (2.0 * s12 + c2))
                    / ((m1 * m1 + m2 * m2 + c1) * (s11 + s22 + c2));
            }
        }
    }
    total / (h * w * c) as f64
}

fn images(h: usize, w: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let mut rng = SeededRng::new(seed);
    let a = rng.rand_uniform((h, w, 3), 0.0, 1.0, DType::F64, &Device::Cpu)?;
    // b: a noisy, slightly darker version of a, so SSIM is well inside (0, 1).
    let n = rng.randn((h, w, 3), DType::F64, &Device::Cpu)?;
    let b = ((&a * 0.8)? + (n * 0.1)?)?.clamp(0.0, 1.0)?;
    Ok((a, b))
}

#[test]
fn window_is_normalised_and_symmetric() {
    let w = gaussian_window(11, 1.5);
    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    for i in 0..5 {
        assert!((w[i] - w[10 - i]).abs() < 1e-15);
        assert!(w[i] < w[i + 1]);
    }
}

#[test]
fn ssim_matches_direct_convolution() -> Result<()> {
    for (h, w, seed) in [(9, 10, 1), (16, 13, 2)] {
        let (a, b) = images(h, w, seed)?;
        let got = ssim(&a, &b)?.to_scalar::<f64>()?;
        let av = a.flatten_all()?.to_vec1::<f64>()?;
        let bv = b.flatten_all()?.to_vec1::<f64>()?;
        let want = ssim_loops(&av, &bv, h, w, 3);
        println!("ssim {h}x{w}: {got:.12} vs loops {want:.12}");
        assert!((got - want).abs() < 1e-10, "{got} vs {want}");
        assert!(want > 0.2 && want < 0.99, "{want}");
        // Identical images: exactly 1 up to rounding.
        let one = ssim(&a, &a)?.to_scalar::<f64>()?;
        assert!((one - 1.0).abs() < 1e-12, "{one}");
    }
    // f32 agrees with f64.
    let (a, b) = images(12, 12, 3)?;
    let f64v = ssim(&a, &b)?.to_scalar::<f64>()?;
    let f32v = ssim(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?)?.to_scalar::<f32>()?;
    assert!((f64v - f32v as f64).abs() < 1e-5);
    Ok(())
}

#[test]
fn ssim_gradient_matches_finite_differences() -> Result<()> {
    let (h, w) = (7, 8);
    let (a, b) = images(h, w, 5)?;
    let op = Ssim::new(h, w, DType::F64, &Device::Cpu)?;
    let va = Var::from_tensor(&a)?;
    let vb = Var::from_tensor(&b)?;
    let s = op.ssim(va.as_tensor(), vb.as_tensor())?;
    let grads = s.backward()?;
    let eps = 1e-6;
    let mut worst: f64 = 0.0;
    for (var, base) in [(&va, &a), (&vb, &b)] {
        let g = grads.get(var).expect("gradient").flatten_all()?.to_vec1::<f64>()?;
        let flat = base.flatten_all()?.to_vec1::<f64>()?;
        let gmax = g.iter().fold(0f64, |m, v| m.max(v.abs()));
        for i in (0..flat.len()).step_by(7) {
            let shifted = |d: f64| -> Result<f64> {
                let mut v = flat.clone();
                v[i] += d;
                let t = Tensor::from_vec(v, (h, w, 3), &Device::Cpu)?;
                let (x, y) = if std::ptr::eq(var, &va) { (t, b.clone()) } else { (a.clone(), t) };
                Ok(op.ssim(&x, &y)?.to_scalar::<f64>()?)
            };
            let fd = (shifted(eps)? - shifted(-eps)?) / (2.0 * eps);
            let err = (fd - g[i]).abs() / gmax;
            worst = worst.max(err);
        }
    }
    println!("ssim FD: worst error relative to the largest gradient {worst:.2e}");
    assert!(worst < 1e-6, "{worst}");
    Ok(())
}
