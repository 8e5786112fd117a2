//! Gradient checks of the splat rasterizer ops: against the dense pure-tensor reference
//! (values and autodiff gradients) and against central finite differences in f64 for every
//! parameter kind.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gen_core::SeededRng;
use gen_scene::splat::dense::render_dense;
use gen_scene::splat::{render, RandomSplatsConfig, RenderConfig, Splats};
use gen_scene::{Camera, Intrinsics};
use glam::DVec3;

const W: usize = 40;
const H: usize = 24;

fn camera() -> Camera {
    let k = Intrinsics::from_fov_y(0.8, W, H).unwrap();
    Camera::look_at(
        k,
        DVec3::new(0.6, -0.8, -4.0),
        DVec3::new(0.0, 0.0, 0.0),
        DVec3::new(0.0, -1.0, 0.0),
    )
    .unwrap()
}

fn scene(seed: u64, n: usize, sh_degree: usize, logit_range: (f32, f32)) -> Splats {
    let cfg = RandomSplatsConfig {
        count: n,
        sh_degree,
        extent: 1.2,
        log_scale_range: (-1.6, -0.9),
        logit_range,
        sh_std: 0.3,
    };
    Splats::random(&cfg, &mut SeededRng::new(seed), DType::F64, &Device::Cpu).unwrap()
}

struct Vars {
    means: Var,
    log_scales: Var,
    quats: Var,
    logits: Var,
    sh: Var,
}

impl Vars {
    fn new(s: &Splats) -> Result<Self> {
        Ok(Self {
            means: Var::from_tensor(&s.means)?,
            log_scales: Var::from_tensor(&s.log_scales)?,
            quats: Var::from_tensor(&s.quats)?,
            logits: Var::from_tensor(&s.opacity_logits)?,
            sh: Var::from_tensor(&s.sh)?,
        })
    }
    fn splats(&self) -> Splats {
        Splats {
            means: self.means.as_tensor().clone(),
            log_scales: self.log_scales.as_tensor().clone(),
            quats: self.quats.as_tensor().clone(),
            opacity_logits: self.logits.as_tensor().clone(),
            sh: self.sh.as_tensor().clone(),
        }
    }
    fn all(&self) -> [(&'static str, &Var); 5] {
        [
            ("means", &self.means),
            ("log_scales", &self.log_scales),
            ("quats", &self.quats),
            ("opacity_logits", &self.logits),
            ("sh", &self.sh),
        ]
    }
}

/// Fixed random weights for a scalar loss over every output.
struct LossWeights {
    rgb: Tensor,
    alpha: Tensor,
    depth: Tensor,
}

impl LossWeights {
    fn new(dtype: DType) -> Result<Self> {
        let mut rng = SeededRng::new(99);
        let d = Device::Cpu;
        Ok(Self {
            rgb: rng.randn((H, W, 3), dtype, &d)?,
            alpha: rng.randn((H, W), dtype, &d)?,
            depth: (rng.randn((H, W), dtype, &d)? * 0.2)?,
        })
    }
    fn loss(&self, rgb: &Tensor, alpha: &Tensor, depth: &Tensor) -> Result<Tensor> {
        let l = (rgb * &self.rgb)?.sum_all()?;
        let l = (l + (alpha * &self.alpha)?.sum_all()?)?;
        Ok((l + (depth * &self.depth)?.sum_all()?)?)
    }
}

fn cfg() -> RenderConfig {
    RenderConfig { background: [0.2, 0.3, 0.4] }
}

fn op_loss(s: &Splats, lw: &LossWeights) -> Result<Tensor> {
    let out = render(s, &camera(), &cfg())?;
    lw.loss(&out.rgb, &out.alpha, &out.depth)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn max_abs(a: &Tensor) -> Result<f64> {
    Ok(a.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Op vs dense reference: images and the gradients of every parameter.
/// Returns the smallest final transmittance `1 - alpha` of the image.
fn check_against_dense(s: &Splats, what: &str) -> Result<f64> {
    let lw = LossWeights::new(DType::F64)?;
    let vars = Vars::new(s)?;
    let sp = vars.splats();
    let out = render(&sp, &camera(), &cfg())?;
    let (rgb_d, alpha_d, depth_d) = render_dense(&sp, &camera(), &cfg())?;
    let visible = out.radii()?.gt(0.0)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    assert!(
        visible >= s.len() as f64 - 1.0,
        "{what}: only {visible} of {} Gaussians visible",
        s.len()
    );
    assert!(max_abs(&out.alpha)? > 0.5, "{what}: scene nearly empty");
    let e_rgb = max_abs_diff(&out.rgb, &rgb_d)?;
    let e_alpha = max_abs_diff(&out.alpha, &alpha_d)?;
    let e_depth = max_abs_diff(&out.depth, &depth_d)?;
    println!("{what}: forward max |op - dense|: rgb {e_rgb:.2e}, alpha {e_alpha:.2e}, depth {e_depth:.2e}");
    assert!(e_rgb < 1e-10 && e_alpha < 1e-10 && e_depth < 1e-10);

    let g_op = lw.loss(&out.rgb, &out.alpha, &out.depth)?.backward()?;
    let g_dense = lw.loss(&rgb_d, &alpha_d, &depth_d)?.backward()?;
    for (name, v) in vars.all() {
        let a = g_op.get(v).unwrap_or_else(|| panic!("{what}: no op gradient for {name}"));
        let b = g_dense.get(v).unwrap_or_else(|| panic!("{what}: no dense gradient for {name}"));
        let scale = max_abs(b)?;
        let err = max_abs_diff(a, b)?;
        println!("{what}: grad {name}: max |op - dense| = {err:.2e} (max |grad| {scale:.2e})");
        assert!(scale > 1e-6, "{what}: dense gradient of {name} is zero");
        assert!(
            err <= 1e-9 * (1.0 + scale),
            "{what}: gradient of {name} differs from the dense reference: {err:.3e}"
        );
    }
    let t_min = (1.0 - &out.alpha)?.flatten_all()?.min(0)?.to_scalar::<f64>()?;
    println!("{what}: smallest final transmittance {t_min:.2e}");
    Ok(t_min)
}

#[test]
fn op_matches_dense_reference_sh3() -> Result<()> {
    check_against_dense(&scene(1, 8, 3, (-1.0, 1.5)), "8 splats, SH 3")?;
    Ok(())
}

#[test]
fn op_matches_dense_reference_opaque_sh1() -> Result<()> {
    // Opacities up to sigmoid(6): alpha clamp at 0.99 and the T < 1e-4 early stop are active.
    let s = scene(2, 16, 1, (5.0, 8.0));
    let t_min = check_against_dense(&s, "16 opaque splats, SH 1")?;
    // Many layers at alpha 0.99 overlap, yet no pixel goes below T = 1e-4: compositing stopped.
    assert!((1e-4..1e-3).contains(&t_min), "early stop not exercised: min T = {t_min}");
    Ok(())
}

/// Central finite differences in f64 for every element of every parameter.
#[test]
fn finite_differences_every_parameter() -> Result<()> {
    let s = scene(3, 8, 3, (-1.0, 1.5));
    let lw = LossWeights::new(DType::F64)?;
    let vars = Vars::new(&s)?;
    let grads = op_loss(&vars.splats(), &lw)?.backward()?;
    let eps = 1e-6;
    for (name, v) in vars.all() {
        let an = grads.get(v).unwrap().flatten_all()?.to_vec1::<f64>()?;
        let base = v.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let shape = v.as_tensor().shape().clone();
        // Elements grouped by kind; SH splits into the DC term and degrees 1..3.
        let k_sh = s.sh.dim(1)?;
        let kind = |i: usize| -> &'static str {
            match name {
                "sh" => match (i / 3) % k_sh {
                    0 => "sh dc",
                    _ => "sh degree 1-3",
                },
                _ => name,
            }
        };
        let mut stats: Vec<(&str, usize, f64, f64)> = Vec::new();
        for i in 0..base.len() {
            let eval = |delta: f64| -> Result<f64> {
                let mut p = base.clone();
                p[i] += delta;
                let t = Tensor::from_vec(p, shape.clone(), &Device::Cpu)?;
                let mut sp = vars.splats();
                match name {
                    "means" => sp.means = t,
                    "log_scales" => sp.log_scales = t,
                    "quats" => sp.quats = t,
                    "opacity_logits" => sp.opacity_logits = t,
                    _ => sp.sh = t,
                }
                Ok(op_loss(&sp, &lw)?.to_scalar::<f64>()?)
            };
            let fd = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
            let err = (fd - an[i]).abs() / (1e-3 + an[i].abs().max(fd.abs()));
            let k = kind(i);
            if !stats.iter().any(|e| e.0 == k) {
                stats.push((k, 0, 0.0, 0.0));
            }
            let e = stats.iter_mut().find(|e| e.0 == k).unwrap();
            e.1 += 1;
            e.2 = e.2.max(err);
            e.3 = e.3.max(an[i].abs());
        }
        for (k, count, worst, max_grad) in stats {
            println!("FD {k}: {count} elements, worst relative error {worst:.2e}, max |grad| {max_grad:.2e}");
            assert!(max_grad > 1e-3, "gradient of {k} is (nearly) zero");
            assert!(worst < 1e-5, "FD mismatch for {k}: {worst:.3e}");
        }
    }
    Ok(())
}

/// The f32 path agrees with the f64 path.
#[test]
fn f32_matches_f64() -> Result<()> {
    let s64 = scene(4, 8, 2, (-1.0, 1.5));
    let to32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let s32 = Splats {
        means: to32(&s64.means),
        log_scales: to32(&s64.log_scales),
        quats: to32(&s64.quats),
        opacity_logits: to32(&s64.opacity_logits),
        sh: to32(&s64.sh),
    };
    let mut res = Vec::new();
    for (s, dt) in [(&s64, DType::F64), (&s32, DType::F32)] {
        let vars = Vars::new(s)?;
        let out = render(&vars.splats(), &camera(), &cfg())?;
        let lw = LossWeights::new(dt)?;
        let g = lw.loss(&out.rgb, &out.alpha, &out.depth)?.backward()?;
        let grads: Vec<Tensor> = vars
            .all()
            .iter()
            .map(|(_, v)| g.get(v).unwrap().to_dtype(DType::F64).unwrap())
            .collect();
        res.push((out.rgb.to_dtype(DType::F64)?, grads));
    }
    let e = max_abs_diff(&res[0].0, &res[1].0)?;
    println!("f32 vs f64 rgb max diff {e:.2e}");
    assert!(e < 1e-4);
    for (k, (a, b)) in res[0].1.iter().zip(&res[1].1).enumerate() {
        let err = max_abs_diff(a, b)?;
        let scale = max_abs(a)?;
        println!("f32 vs f64 grad {k}: max diff {err:.2e} of max {scale:.2e}");
        assert!(err < 1e-3 * (1.0 + scale));
    }
    Ok(())
}

/// Gradients do not depend on the number of threads (fixed-order reduction).
#[test]
fn gradients_independent_of_thread_count() -> Result<()> {
    let s = scene(5, 8, 1, (-1.0, 1.5));
    let lw = LossWeights::new(DType::F64)?;
    let run = |threads: usize| -> Vec<Vec<f64>> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let vars = Vars::new(&s).unwrap();
            let g = op_loss(&vars.splats(), &lw).unwrap().backward().unwrap();
            vars.all()
                .iter()
                .map(|(_, v)| g.get(v).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap())
                .collect()
        })
    };
    assert_eq!(run(1), run(3));
    Ok(())
}

/// The screen-space probe's gradient (d loss / d projection) against central differences.
#[test]
fn probe_gradient_matches_finite_differences() -> Result<()> {
    use gen_scene::splat::render_with_probe;
    let s = scene(6, 8, 1, (-1.0, 1.5));
    let lw = LossWeights::new(DType::F64)?;
    let n = s.len();
    let loss_at = |probe: &Tensor| -> Result<Tensor> {
        let out = render_with_probe(&s, &camera(), &cfg(), probe)?;
        lw.loss(&out.rgb, &out.alpha, &out.depth)
    };
    let probe = Var::zeros((n, 8), DType::F64, &Device::Cpu)?;
    let g = loss_at(probe.as_tensor())?.backward()?;
    let an = g.get(&probe).expect("probe gradient").to_vec2::<f64>()?;
    let eps = 1e-6;
    let mut worst = 0.0f64;
    for i in 0..n {
        // u, v, conic a, b, c, depth (the radius column is not differentiable).
        for c in 0..6 {
            let mut d = vec![0.0; n * 8];
            d[i * 8 + c] = eps;
            let dp = Tensor::from_vec(d, (n, 8), &Device::Cpu)?;
            let lp = loss_at(&dp)?.to_scalar::<f64>()?;
            let lm = loss_at(&dp.neg()?)?.to_scalar::<f64>()?;
            let fd = (lp - lm) / (2.0 * eps);
            worst = worst.max((fd - an[i][c]).abs() / (1e-3 + fd.abs().max(an[i][c].abs())));
        }
    }
    println!("FD probe (u, v, conic, depth): worst relative error {worst:.2e}");
    assert!(worst < 1e-5, "{worst}");
    Ok(())
}
