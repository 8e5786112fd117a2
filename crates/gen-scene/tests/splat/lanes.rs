//! The rasterizer's fast paths against the dense reference: empty tiles and blocks, the f32
//! lane kernels (vectorised `exp`, 16-pixel lanes, early stop within a block), equal depths.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gen_core::SeededRng;
use gen_scene::splat::dense::render_dense;
use gen_scene::splat::{render, RenderConfig, Splats};
use gen_scene::{Camera, Intrinsics};
use glam::{DMat3, DVec3};

/// 80×64 pixels: 5×4 tiles of 16², each 4×4 blocks of 4².
const W: usize = 80;
const H: usize = 64;
const BG: [f64; 3] = [0.25, 0.5, 0.75];

/// Camera at z = -4 looking down +z (OpenCV axes: x right, y down), fov_y 0.8.
fn camera() -> Camera {
    let k = Intrinsics::from_fov_y(0.8, W, H).unwrap();
    Camera::new(k, DMat3::IDENTITY, DVec3::new(0.0, 0.0, 4.0)).unwrap()
}

fn cfg() -> RenderConfig {
    RenderConfig { background: BG }
}

/// `n` random Gaussians with means uniform in `centre ± half`, log-scales in `log_scale`,
/// logits in `logit`, SH degree 1.
fn scene(
    seed: u64,
    n: usize,
    centre: [f64; 3],
    half: f32,
    log_scale: (f32, f32),
    logit: (f32, f32),
    dtype: DType,
) -> Result<Splats> {
    let mut rng = SeededRng::new(seed);
    let d = Device::Cpu;
    let c = Tensor::new(&centre, &d)?.to_dtype(DType::F32)?.unsqueeze(0)?;
    let means = rng.rand_uniform((n, 3), -half, half, DType::F32, &d)?.broadcast_add(&c)?;
    let s = Splats {
        means,
        log_scales: rng.rand_uniform((n, 3), log_scale.0, log_scale.1, DType::F32, &d)?,
        quats: rng.randn((n, 4), DType::F32, &d)?,
        opacity_logits: rng.rand_uniform(n, logit.0, logit.1, DType::F32, &d)?,
        sh: (rng.randn((n, 4, 3), DType::F32, &d)? * 0.4)?,
    };
    Ok(Splats {
        means: s.means.to_dtype(dtype)?,
        log_scales: s.log_scales.to_dtype(dtype)?,
        quats: s.quats.to_dtype(dtype)?,
        opacity_logits: s.opacity_logits.to_dtype(dtype)?,
        sh: s.sh.to_dtype(dtype)?,
    })
}

fn vars(s: &Splats) -> Result<[Var; 5]> {
    Ok([
        Var::from_tensor(&s.means)?,
        Var::from_tensor(&s.log_scales)?,
        Var::from_tensor(&s.quats)?,
        Var::from_tensor(&s.opacity_logits)?,
        Var::from_tensor(&s.sh)?,
    ])
}

fn splats(v: &[Var; 5]) -> Splats {
    Splats {
        means: v[0].as_tensor().clone(),
        log_scales: v[1].as_tensor().clone(),
        quats: v[2].as_tensor().clone(),
        opacity_logits: v[3].as_tensor().clone(),
        sh: v[4].as_tensor().clone(),
    }
}

const NAMES: [&str; 5] = ["means", "log_scales", "quats", "opacity_logits", "sh"];

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    max_abs(&(a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?)
}

/// Loss `Σ w_rgb·rgb + Σ w_a·alpha + Σ w_d·depth` with fixed random weights, times `mask`
/// `(H, W)` (1 where the loss looks).
fn loss(rgb: &Tensor, alpha: &Tensor, depth: &Tensor, mask: &Tensor, seed: u64) -> Result<Tensor> {
    let dt = rgb.dtype();
    let mut rng = SeededRng::new(seed);
    let d = Device::Cpu;
    let m = mask.to_dtype(dt)?;
    let wr = rng.randn((H, W, 3), dt, &d)?.broadcast_mul(&m.unsqueeze(2)?)?;
    let wa = (rng.randn((H, W), dt, &d)? * &m)?;
    let wd = ((rng.randn((H, W), dt, &d)? * 0.2)? * &m)?;
    let l = (rgb * wr)?.sum_all()?;
    let l = (l + (alpha * wa)?.sum_all()?)?;
    Ok((l + (depth * wd)?.sum_all()?)?)
}

/// Splats in the top-left quarter leave whole tiles (and blocks at the footprints' edges)
/// without any Gaussian: there the image is exactly the background with alpha and depth 0, a
/// loss on those pixels only gives exactly zero gradients, and everything matches the dense
/// reference.
#[test]
fn empty_tiles_give_background_and_zero_gradients() -> Result<()> {
    // The image spans about ±2.8 × ±2.25 world units at the means' depth.
    let s = scene(11, 12, [-1.6, -1.2, 0.0], 0.6, (-2.6, -2.0), (0.0, 3.0), DType::F64)?;
    let v = vars(&s)?;
    let out = render(&splats(&v), &camera(), &cfg())?;
    let rgb = out.rgb.to_vec3::<f64>()?;
    let alpha = out.alpha.to_vec2::<f64>()?;
    let depth = out.depth.to_vec2::<f64>()?;
    // Pixels every Gaussian misses (alpha exactly 0) must be exactly the background.
    let mut empty = vec![0.0f64; H * W];
    let mut n_empty_tiles = 0;
    for ty in 0..H / 16 {
        for tx in 0..W / 16 {
            let all = (0..16).all(|y| (0..16).all(|x| alpha[ty * 16 + y][tx * 16 + x] == 0.0));
            n_empty_tiles += all as usize;
        }
    }
    for y in 0..H {
        for x in 0..W {
            if alpha[y][x] == 0.0 {
                assert_eq!(rgb[y][x].as_slice(), BG.as_slice(), "pixel ({y},{x})");
                assert_eq!(depth[y][x], 0.0, "pixel ({y},{x})");
                empty[y * W + x] = 1.0;
            }
        }
    }
    let covered = H * W - empty.iter().filter(|&&e| e > 0.0).count();
    println!("{n_empty_tiles} of 20 tiles empty; {covered} covered pixels");
    assert!(n_empty_tiles >= 8, "scene should leave tiles empty");
    assert!(covered > 300, "scene nearly empty: {covered} covered pixels");

    // A loss on the empty pixels only: exactly zero gradients.
    let mask = Tensor::from_vec(empty, (H, W), &Device::Cpu)?;
    let g = loss(&out.rgb, &out.alpha, &out.depth, &mask, 3)?.backward()?;
    for (name, var) in NAMES.iter().zip(&v) {
        let gr = g.get(var).expect("gradient");
        assert_eq!(max_abs(gr)?, 0.0, "gradient of {name} from empty pixels");
    }

    // Everything against the dense reference, gradients of a loss on all pixels.
    let ones = Tensor::ones((H, W), DType::F64, &Device::Cpu)?;
    let (rgb_d, alpha_d, depth_d) = render_dense(&splats(&v), &camera(), &cfg())?;
    let e = max_abs_diff(&out.rgb, &rgb_d)?
        .max(max_abs_diff(&out.alpha, &alpha_d)?)
        .max(max_abs_diff(&out.depth, &depth_d)?);
    println!("forward max |op - dense| {e:.2e}");
    assert!(e < 1e-10);
    let g = loss(&out.rgb, &out.alpha, &out.depth, &ones, 4)?.backward()?;
    let gd = loss(&rgb_d, &alpha_d, &depth_d, &ones, 4)?.backward()?;
    for (name, var) in NAMES.iter().zip(&v) {
        let (a, b) = (g.get(var).expect("op grad"), gd.get(var).expect("dense grad"));
        let (err, scale) = (max_abs_diff(a, b)?, max_abs(b)?);
        println!("grad {name}: max |op - dense| {err:.2e} of {scale:.2e}");
        assert!(scale > 1e-6 && err <= 1e-9 * (1.0 + scale), "{name}: {err:.3e}");
    }
    Ok(())
}

/// The f32 kernels (vectorised `exp`, 16-pixel lanes; wider vectors where the CPU has them)
/// against the f64 dense reference on a scene where some pixels of a block stop early (opaque
/// layers) while their neighbours go on: values to f32 rounding, gradients to 1e-4 relative.
#[test]
fn f32_lanes_match_dense_f64() -> Result<()> {
    let s64 = scene(12, 60, [0.0, 0.0, 0.0], 1.0, (-2.0, -1.0), (0.0, 8.0), DType::F64)?;
    let to32 = |t: &Tensor| t.to_dtype(DType::F32);
    let s32 = Splats {
        means: to32(&s64.means)?,
        log_scales: to32(&s64.log_scales)?,
        quats: to32(&s64.quats)?,
        opacity_logits: to32(&s64.opacity_logits)?,
        sh: to32(&s64.sh)?,
    };
    let ones32 = Tensor::ones((H, W), DType::F32, &Device::Cpu)?;
    let ones64 = Tensor::ones((H, W), DType::F64, &Device::Cpu)?;
    let v32 = vars(&s32)?;
    let out = render(&splats(&v32), &camera(), &cfg())?;
    let v64 = vars(&s64)?;
    let (rgb_d, alpha_d, depth_d) = render_dense(&splats(&v64), &camera(), &cfg())?;
    let t_min = (1.0 - &alpha_d)?.flatten_all()?.min(0)?.to_scalar::<f64>()?;
    let t_max = (1.0 - &alpha_d)?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    println!("final T from {t_min:.2e} to {t_max:.2e}");
    assert!(t_min < 2e-4 && t_max > 0.5, "want early stops and open pixels");
    let e_rgb = max_abs_diff(&out.rgb, &rgb_d)?;
    let e_alpha = max_abs_diff(&out.alpha, &alpha_d)?;
    let e_depth = max_abs_diff(&out.depth, &depth_d)?;
    println!("f32 op vs f64 dense: rgb {e_rgb:.2e}, alpha {e_alpha:.2e}, depth {e_depth:.2e}");
    assert!(e_rgb < 2e-5 && e_alpha < 2e-5 && e_depth < 1e-4);
    let g = loss(&out.rgb, &out.alpha, &out.depth, &ones32, 5)?.backward()?;
    let gd = loss(&rgb_d, &alpha_d, &depth_d, &ones64, 5)?.backward()?;
    for (k, name) in NAMES.iter().enumerate() {
        let a = g.get(&v32[k]).expect("op grad");
        let b = gd.get(&v64[k]).expect("dense grad");
        let (err, scale) = (max_abs_diff(a, b)?, max_abs(b)?);
        println!("grad {name}: max |f32 op - f64 dense| {err:.2e} of {scale:.2e}");
        assert!(scale > 1e-6 && err < 1e-4 * (1.0 + scale), "{name}: {err:.3e}");
    }
    Ok(())
}

/// Gaussians at exactly the same depth composite in index order (the binning's tie rule),
/// as in the dense reference; swapping them changes the image.
#[test]
fn equal_depths_composite_in_index_order() -> Result<()> {
    let d = Device::Cpu;
    let make = |first_red: bool| -> Result<Splats> {
        let (red, green) = ([1.5f64, -1.5, -1.5], [-1.5f64, 1.5, -1.5]);
        let (c0, c1) = if first_red { (red, green) } else { (green, red) };
        let mut sh = vec![0.0f64; 2 * 4 * 3];
        sh[..3].copy_from_slice(&c0);
        sh[12..15].copy_from_slice(&c1);
        Ok(Splats {
            // Same z, so the same depth; overlapping footprints.
            means: Tensor::new(&[[0.05f64, 0.0, 0.5], [-0.05, 0.02, 0.5]], &d)?,
            log_scales: Tensor::new(&[[-1.2f64, -1.4, -1.3], [-1.3, -1.2, -1.4]], &d)?,
            quats: Tensor::new(&[[1.0f64, 0.1, 0.0, 0.0], [1.0, 0.0, 0.2, 0.0]], &d)?,
            opacity_logits: Tensor::new(&[3.0f64, 3.0], &d)?,
            sh: Tensor::from_vec(sh, (2, 4, 3), &d)?,
        })
    };
    let mut centre = Vec::new();
    for first_red in [true, false] {
        let s = make(first_red)?;
        let out = render(&s, &camera(), &cfg())?;
        let (rgb_d, alpha_d, _) = render_dense(&s, &camera(), &cfg())?;
        assert!(max_abs_diff(&out.rgb, &rgb_d)? < 1e-10);
        assert!(max_abs_diff(&out.alpha, &alpha_d)? < 1e-10);
        centre.push(out.rgb.get(H / 2)?.get(W / 2)?.to_vec1::<f64>()?);
    }
    println!("centre pixel: red first {:?}, green first {:?}", centre[0], centre[1]);
    assert!(centre[0][0] > centre[0][1] && centre[1][1] > centre[1][0]);
    Ok(())
}
