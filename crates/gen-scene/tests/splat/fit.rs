//! End to end: the rasterizer's gradients drive a candle optimiser. Splats perturbed away from a
//! target scene are fitted back to its render with AdamW on `Var`s.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use gen_core::SeededRng;
use gen_scene::splat::{
    render, render_with_probe, RandomSplatsConfig, RenderConfig, SplatVars, Splats,
};
use gen_scene::{Camera, Intrinsics};
use glam::DVec3;

#[test]
fn adam_fits_perturbed_splats_to_a_target_render() -> Result<()> {
    let k = Intrinsics::from_fov_y(0.8, 32, 32)?;
    let cam =
        Camera::look_at(k, DVec3::new(0.0, -0.5, -4.0), DVec3::ZERO, DVec3::new(0.0, -1.0, 0.0))?;
    let cfg = RenderConfig { background: [1.0, 1.0, 1.0] };
    let scene = RandomSplatsConfig {
        count: 24,
        sh_degree: 1,
        extent: 0.9,
        log_scale_range: (-2.0, -1.3),
        logit_range: (0.0, 2.0),
        sh_std: 0.6,
    };
    let dev = Device::Cpu;
    let target = Splats::random(&scene, &mut SeededRng::new(11), DType::F32, &dev)?;
    let target_rgb = render(&target, &cam, &cfg)?.rgb;
    let mut rng = SeededRng::new(12);
    let noise = |t: &Tensor, s: f64, rng: &mut SeededRng| -> Result<Tensor> {
        Ok((t + (rng.randn(t.shape(), DType::F32, &dev)? * s)?)?)
    };
    let start = Splats {
        means: noise(&target.means, 0.08, &mut rng)?,
        log_scales: noise(&target.log_scales, 0.2, &mut rng)?,
        quats: noise(&target.quats, 0.2, &mut rng)?,
        opacity_logits: noise(&target.opacity_logits, 0.5, &mut rng)?,
        sh: noise(&target.sh, 0.3, &mut rng)?,
    };
    let vars = SplatVars::new(&start)?;
    let splats = || vars.splats();
    let mut opt =
        AdamW::new(vars.all(), ParamsAdamW { lr: 0.01, weight_decay: 0.0, ..Default::default() })?;
    let mut losses = Vec::new();
    for _ in 0..60 {
        let probe = Var::zeros((24, 8), DType::F32, &dev)?;
        let out = render_with_probe(&splats(), &cam, &cfg, &probe)?;
        let loss = (&out.rgb - &target_rgb)?.sqr()?.mean_all()?;
        losses.push(loss.to_scalar::<f32>()?);
        let grads = loss.backward()?;
        // Screen-space mean gradients (for density control) are available per Gaussian.
        let g2d = grads.get(&probe).expect("probe gradient").narrow(1, 0, 2)?;
        assert!(g2d.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        opt.step(&grads)?;
    }
    // The probe changes no value.
    let probe = Var::zeros((24, 8), DType::F32, &dev)?;
    let a =
        render_with_probe(&splats(), &cam, &cfg, &probe)?.rgb.flatten_all()?.to_vec1::<f32>()?;
    let b = render(&splats(), &cam, &cfg)?.rgb.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, b);
    let (first, last) = (losses[0], *losses.last().unwrap());
    println!("fit: loss {first:.5} -> {last:.5}");
    assert!(first > 1e-3, "the perturbation should be visible: {first}");
    assert!(last < 0.25 * first, "loss only went from {first} to {last}");
    Ok(())
}
