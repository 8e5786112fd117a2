//! The neural-field fitter on a tiny synthetic scene (views rendered from random splats): the
//! batch renderer matches `render_volume`, a fit lowers the loss and raises PSNR, resume from a
//! checkpoint is bit-identical, and `fit_field` writes its outputs.

use anyhow::Result;
use candle_core::{DType, Device};
use gen_core::SeededRng;
use gen_scene::field::{render_volume, FieldConfig};
use gen_scene::fit::field::{
    evaluate_field, fit_field, render_field_image, render_field_image_grad, render_rays,
    FieldExportSet, FieldFitConfig, FieldFitEvent, FieldOutputs, FieldTrainer, PhotometricLoss,
    Ray,
};
use gen_scene::fit::PosedImage;
use gen_scene::splat::{render, RandomSplatsConfig, RenderConfig, Splats};
use gen_scene::{Camera, Intrinsics};
use glam::DVec3;

const BG: [f64; 3] = [1.0, 1.0, 1.0];

/// `n` views of `size`² pixels on a ring around a random splat scene, rotated by `phase`
/// (a fraction of the step between views; 0.5 gives views between the training ones).
fn views(n: usize, size: usize, phase: f64) -> Result<Vec<PosedImage>> {
    let target = Splats::random(
        &RandomSplatsConfig {
            count: 12,
            sh_degree: 0,
            extent: 0.5,
            log_scale_range: (-1.6, -1.1),
            logit_range: (2.0, 4.0),
            sh_std: 0.8,
        },
        &mut SeededRng::new(77),
        DType::F32,
        &Device::Cpu,
    )?;
    let k = Intrinsics::from_fov_y(0.9, size, size)?;
    let mut out = Vec::new();
    for i in 0..n {
        let a = (i as f64 + phase) / n as f64 * std::f64::consts::TAU;
        let eye = DVec3::new(3.0 * a.cos(), 3.0 * a.sin(), 1.0 + 0.5 * (i % 2) as f64);
        let cam = Camera::look_at(k, eye, DVec3::ZERO, DVec3::Z)?;
        let r = render(&target, &cam, &RenderConfig { background: BG })?;
        out.push(PosedImage { camera: cam, rgb: r.rgb, mask: Some(r.alpha) });
    }
    Ok(out)
}

fn cfg(steps: u64) -> FieldFitConfig {
    FieldFitConfig {
        field: FieldConfig::tiny(),
        steps,
        samples_per_ray: 24,
        rays_per_batch: 256,
        lr: 2e-2,
        lr_final: 5e-3,
        loss: PhotometricLoss::Mse,
        mask_weight: 0.1,
        occupancy_res: 8,
        occupancy_every: 4,
        occupancy_threshold: 0.01,
        background: BG,
        seed: 3,
        ..Default::default()
    }
}

fn params(t: &FieldTrainer) -> Result<Vec<Vec<f32>>> {
    t.field().vars().iter().map(|v| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?)).collect()
}

#[test]
fn ray_batches_match_the_image_renderer() -> Result<()> {
    let v = views(1, 6, 0.0)?;
    let t = FieldTrainer::new(cfg(1), v.clone())?;
    let vc = t.config().volume_config();
    let cam = &v[0].camera;
    let img = render_volume(t.field(), cam, &vc, None, None)?;
    let rays: Vec<Ray> = (0..6)
        .flat_map(|i| (0..6).map(move |j| (i, j)))
        .map(|(i, j)| Ray::through_pixel(cam, i, j))
        .collect();
    let out = render_rays(t.field(), &rays, &vc, None, None)?;
    let a = img.rgb.flatten_all()?.to_vec1::<f32>()?;
    let b = out.rgb.flatten_all()?.to_vec1::<f32>()?;
    let oa = img.opacity.flatten_all()?.to_vec1::<f32>()?;
    let ob = out.opacity.flatten_all()?.to_vec1::<f32>()?;
    let err =
        a.iter().zip(&b).chain(oa.iter().zip(&ob)).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(err < 1e-5, "max difference {err}");
    // The untrained field is semi-transparent everywhere: some opacity, not saturated.
    assert!(oa.iter().any(|&o| o > 0.05 && o < 0.999), "{oa:?}");
    Ok(())
}

#[test]
fn fitting_lowers_the_loss_and_raises_psnr() -> Result<()> {
    let train = views(8, 16, 0.0)?;
    let held = views(4, 16, 0.5)?;
    let mut t = FieldTrainer::new(cfg(80), train)?;
    let vc = t.config().volume_config();
    let before = evaluate_field(t.field(), &held, &vc, None)?;
    let mut losses = Vec::new();
    while !t.is_done() {
        let s = t.step()?;
        assert!(s.loss.is_finite());
        losses.push(s.loss);
    }
    let after = evaluate_field(t.field(), &held, &vc, Some(t.occupancy()))?;
    let first: f64 = losses[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
    eprintln!(
        "loss {first:.4} -> {last:.4}; held-out PSNR {:.2} -> {:.2} dB, IoU {:?} -> {:?}; \
         occupied {:.3}",
        before.psnr,
        after.psnr,
        before.iou,
        after.iou,
        t.occupancy().occupied_fraction()
    );
    assert!(last < 0.6 * first, "loss {first} -> {last}");
    assert!(after.psnr > before.psnr + 3.0, "{} -> {}", before.psnr, after.psnr);
    assert!(after.iou.unwrap() > before.iou.unwrap());
    Ok(())
}

#[test]
fn resume_is_bit_identical() -> Result<()> {
    let v = views(4, 12, 0.0)?;
    let c = cfg(10);
    let mut full = FieldTrainer::new(c.clone(), v.clone())?;
    let mut full_losses = Vec::new();
    while !full.is_done() {
        full_losses.push(full.step()?.loss);
    }
    let dir = std::env::temp_dir().join(format!("gen-fit-field-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ckpt = dir.join("ckpt.safetensors");
    let mut a = FieldTrainer::new(c.clone(), v.clone())?;
    let mut losses = Vec::new();
    for _ in 0..6 {
        losses.push(a.step()?.loss);
    }
    a.save_checkpoint(&ckpt)?;
    drop(a);
    let mut b = FieldTrainer::resume(c.clone(), v.clone(), &ckpt)?;
    assert_eq!(b.step_count(), 6);
    while !b.is_done() {
        losses.push(b.step()?.loss);
    }
    assert_eq!(losses, full_losses);
    assert_eq!(params(&b)?, params(&full)?);
    assert_eq!(b.occupancy(), full.occupancy());
    // A different seed or field size is refused with a clear message.
    let err = FieldTrainer::resume(FieldFitConfig { seed: 4, ..c.clone() }, v.clone(), &ckpt)
        .err()
        .expect("seed mismatch");
    assert!(err.to_string().contains("seed"), "{err}");
    let mut bigger = c.clone();
    bigger.field.hidden = 16;
    let err = FieldTrainer::resume(bigger, v.clone(), &ckpt).err().expect("config mismatch");
    assert!(err.to_string().contains("`field.hidden` 8 in the checkpoint, 16 now"), "{err}");
    // So are a checkpoint of other views (another object) and one of a longer run.
    let other = views(4, 12, 0.25)?;
    let err = FieldTrainer::resume(c.clone(), other, &ckpt).err().expect("data mismatch");
    assert!(err.to_string().contains("other training data"), "{err}");
    let err = FieldTrainer::resume(FieldFitConfig { steps: 3, ..c.clone() }, v.clone(), &ckpt)
        .err()
        .expect("config mismatch");
    assert!(err.to_string().contains("`steps` 10 in the checkpoint, 3 now"), "{err}");
    // The output schedule is not part of the identity.
    FieldTrainer::resume(FieldFitConfig { preview_every: 7, ..c.clone() }, v, &ckpt)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn fit_field_writes_outputs_and_events() -> Result<()> {
    let v = views(6, 16, 0.0)?;
    let dir = std::env::temp_dir().join(format!("gen-fit-field-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut out = FieldOutputs::new(&dir);
    out.exports = FieldExportSet::parse("mesh,turntable")?;
    out.mesh_resolution = 20;
    out.mesh_threshold = 2.0;
    out.turntable_frames = 3;
    out.turntable_size = 12;
    let c = FieldFitConfig { checkpoint_every: 20, preview_every: 20, ..cfg(60) };
    let mut events = Vec::new();
    let t = fit_field(c.clone(), v.clone(), &out, &mut |e| events.push(e.clone()))?;
    assert_eq!(t.step_count(), 60);
    for f in [
        "config.json",
        "checkpoint.safetensors",
        "previews/step_000020.png",
        "previews/step_000060.png",
        "mesh.glb",
        "mesh.obj",
        "turntable.gif",
        "turntable.png",
    ] {
        let p = dir.join(f);
        assert!(p.is_file() && std::fs::metadata(&p)?.len() > 0, "{f} missing");
    }
    let obj = std::fs::read_to_string(dir.join("mesh.obj"))?;
    assert!(obj.lines().filter(|l| l.starts_with("f ")).count() > 10);
    let cfg_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    assert_eq!(cfg_json["representation"], "field");
    assert_eq!(cfg_json["rays_per_batch"], 256);
    assert!(matches!(events.first(), Some(FieldFitEvent::Started { step: 0, .. })));
    assert!(matches!(events.last(), Some(FieldFitEvent::Finished { step: 60, .. })));
    assert_eq!(events.iter().filter(|e| matches!(e, FieldFitEvent::Step(_))).count(), 60);
    // Resume at the end does no further steps and reloads the same parameters.
    out.resume = true;
    out.exports = FieldExportSet::default();
    let t2 = fit_field(c.clone(), v.clone(), &out, &mut |_| {})?;
    assert_eq!(params(&t2)?, params(&t)?);
    // An unreachable iso-level is a clear error, splat formats are refused.
    out.exports = FieldExportSet::parse("mesh")?;
    out.mesh_threshold = 1e9;
    let err = fit_field(c, v, &out, &mut |_| {}).err().expect("empty mesh");
    assert!(err.to_string().contains("iso-level"), "{err}");
    let err = FieldExportSet::parse("ply").expect_err("splat format");
    assert!(err.to_string().contains("splat format"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn whole_images_render_with_gradients() -> Result<()> {
    let v = views(1, 6, 0.0)?;
    let t = FieldTrainer::new(cfg(1), v.clone())?;
    let vc = t.config().volume_config();
    let cam = &v[0].camera;
    // Same values as the detached renderer.
    let (rgb, op) = render_field_image_grad(t.field(), cam, &vc, None, None)?;
    let (rgb0, op0) = render_field_image(t.field(), cam, &vc, None)?;
    assert_eq!(rgb.dims(), [6, 6, 3]);
    let d = (&rgb - &rgb0)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let e = (&op - &op0)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(d == 0.0 && e == 0.0, "{d} {e}");
    // d/dθ of Σ rgb ⊙ G (an image gradient G as score distillation gives) against central
    // differences, for the entry of the colour head's last parameter with the largest gradient.
    let g = candle_core::Tensor::arange(0f32, 108.0, &Device::Cpu)?.affine(0.37, 0.0)?.sin()?;
    let g = g.reshape((6, 6, 3))?;
    let objective = |field: &gen_scene::field::CamField| -> Result<candle_core::Tensor> {
        let (rgb, _) = render_field_image_grad(field, cam, &vc, None, None)?;
        Ok(gen_scene::fit::image_gradient_loss(&rgb, &g)?)
    };
    let var = t.field().vars().last().cloned().expect("parameters");
    let grads = objective(t.field())?.backward()?;
    let gv = grads.get(&var).expect("gradient reaches the colour head").flatten_all()?;
    let gv = gv.to_vec1::<f32>()?;
    let (i, &analytic) =
        gv.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
    assert!(analytic.abs() > 1e-3, "gradient {analytic}");
    let base = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    let eps = 1e-2f32;
    let at = |delta: f32| -> Result<f32> {
        let mut p = base.clone();
        p[i] += delta;
        var.set(&candle_core::Tensor::from_vec(p, var.dims(), &Device::Cpu)?)?;
        Ok(objective(t.field())?.to_scalar::<f32>()?)
    };
    let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
    assert!((fd - analytic).abs() <= 5e-3 + 0.02 * analytic.abs(), "fd {fd} vs {analytic}");
    Ok(())
}
