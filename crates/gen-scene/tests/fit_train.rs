//! The splat trainer on tiny synthetic scenes: the fit improves with density control running,
//! resume from a checkpoint is bit-identical to an uninterrupted run, and `fit` writes its
//! outputs.

use anyhow::Result;
use candle_core::{DType, Device};
use gen_core::SeededRng;
use gen_scene::density::DensityConfig;
use gen_scene::fit::{
    evaluate, fit, ExportSet, FitConfig, FitEvent, FitOutputs, InitConfig, InitRegion, PosedImage,
    Trainer,
};
use gen_scene::splat::{render, RandomSplatsConfig, RenderConfig, Splats};
use gen_scene::{Camera, Intrinsics};
use glam::DVec3;

const BG: [f64; 3] = [1.0, 1.0, 1.0];

/// `n` views of 16×16 pixels on a ring around a random target scene.
fn views(n: usize, size: usize) -> Result<Vec<PosedImage>> {
    let target = Splats::random(
        &RandomSplatsConfig {
            count: 12,
            sh_degree: 0,
            extent: 0.6,
            log_scale_range: (-1.8, -1.2),
            logit_range: (1.0, 3.0),
            sh_std: 0.8,
        },
        &mut SeededRng::new(77),
        DType::F32,
        &Device::Cpu,
    )?;
    let k = Intrinsics::from_fov_y(0.9, size, size)?;
    let mut out = Vec::new();
    for i in 0..n {
        let a = i as f64 / n as f64 * std::f64::consts::TAU;
        let eye = DVec3::new(3.5 * a.cos(), 3.5 * a.sin(), 1.0);
        let cam = Camera::look_at(k, eye, DVec3::ZERO, DVec3::Z)?;
        let r = render(&target, &cam, &RenderConfig { background: BG })?;
        out.push(PosedImage { camera: cam, rgb: r.rgb, mask: Some(r.alpha) });
    }
    Ok(out)
}

fn cfg(steps: u64) -> FitConfig {
    FitConfig {
        steps,
        background: BG,
        init: InitConfig {
            count: 60,
            region: InitRegion::Box { min: [-0.8; 3], max: [0.8; 3] },
            scale: 0.1,
            opacity: 0.1,
        },
        density: DensityConfig {
            densify_from: 4,
            densify_until: 40,
            interval: 4,
            grad_threshold: 2e-3,
            max_gaussians: 2000,
            opacity_reset_interval: 16,
            ..Default::default()
        },
        seed: 5,
        ..Default::default()
    }
}

#[test]
fn training_reduces_the_loss_with_density_control() -> Result<()> {
    let v = views(6, 16)?;
    let mut t = Trainer::new(cfg(60), v.clone())?;
    let before = evaluate(&t.splats(), &v, BG)?;
    let mut densified = 0;
    let mut grew = false;
    while !t.is_done() {
        let info = t.step()?;
        if let Some(r) = info.density {
            densified += 1;
            grew |= r.cloned + r.split > 0;
            assert_eq!(r.after, info.gaussians);
        }
    }
    let after = evaluate(&t.splats(), &v, BG)?;
    println!(
        "tiny fit: PSNR {:.2} -> {:.2} dB, IoU {:?} -> {:?}, {} Gaussians",
        before.psnr,
        after.psnr,
        before.iou,
        after.iou,
        t.splats().len()
    );
    assert_eq!(densified, 10, "densify at 4, 8, ..., 40");
    assert!(grew, "some Gaussians were cloned or split");
    assert!(after.psnr > before.psnr + 3.0);
    assert!(after.iou.unwrap() > before.iou.unwrap());
    Ok(())
}

#[test]
fn resume_is_bit_identical() -> Result<()> {
    let v = views(4, 12)?;
    let c = cfg(22);
    let mut full = Trainer::new(c.clone(), v.clone())?;
    while !full.is_done() {
        full.step()?;
    }
    let dir = std::env::temp_dir().join(format!("gen-fit-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ckpt = dir.join("ckpt.safetensors");
    let mut first = Trainer::new(c.clone(), v.clone())?;
    // Stop between densifications (step 10), so the statistics must travel too.
    for _ in 0..10 {
        first.step()?;
    }
    first.save_checkpoint(&ckpt)?;
    drop(first);
    let mut second = Trainer::resume(c.clone(), v.clone(), &ckpt)?;
    assert_eq!(second.step_count(), 10);
    while !second.is_done() {
        second.step()?;
    }
    let (a, b) = (full.splats(), second.splats());
    assert_eq!(a.len(), b.len());
    for (x, y) in [
        (&a.means, &b.means),
        (&a.log_scales, &b.log_scales),
        (&a.quats, &b.quats),
        (&a.opacity_logits, &b.opacity_logits),
        (&a.sh, &b.sh),
    ] {
        let x = x.flatten_all()?.to_vec1::<f32>()?;
        let y = y.flatten_all()?.to_vec1::<f32>()?;
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    // A checkpoint from another seed is refused.
    let other = FitConfig { seed: 6, ..c };
    let e = Trainer::resume(other, v, &ckpt).err().expect("seed mismatch").to_string();
    assert!(e.contains("seed"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn fit_writes_outputs_and_events() -> Result<()> {
    let v = views(4, 12)?;
    let dir = std::env::temp_dir().join(format!("gen-fit-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut out = FitOutputs::new(&dir);
    out.exports = ExportSet::parse("ply,glb,mesh")?;
    out.mesh_resolution = 12;
    out.mesh_threshold = 0.3;
    let mut c = FitConfig { checkpoint_every: 4, preview_every: 5, ..cfg(10) };
    // Opaque enough from the start for the density to cross the mesh iso-level.
    c.init.opacity = 0.7;
    let mut events = Vec::new();
    let t = fit(c.clone(), v.clone(), &out, &mut |e| events.push(e.clone()))?;
    assert_eq!(t.step_count(), 10);
    for f in [
        "config.json",
        "checkpoint.safetensors",
        "previews/step_000005.png",
        "previews/step_000010.png",
        "splats.ply",
        "splats.glb",
        "mesh.glb",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    assert_eq!(cfg_json["steps"], 10);
    assert_eq!(cfg_json["ssim_weight"], 0.2);
    let steps = events.iter().filter(|e| matches!(e, FitEvent::Step(_))).count();
    assert_eq!(steps, 10);
    assert!(matches!(events.last(), Some(FitEvent::Finished { step: 10, .. })));
    // AdamW keeps two moments per parameter of the final splats.
    if let Some(FitEvent::Finished { gaussians, optimizer_state_bytes, .. }) = events.last() {
        assert!(
            *optimizer_state_bytes > 0 && optimizer_state_bytes % gaussians == 0,
            "{optimizer_state_bytes} bytes for {gaussians} Gaussians"
        );
    }
    // Resuming a finished run does no more steps.
    out.resume = true;
    let mut n = 0;
    fit(c, v, &out, &mut |e| n += matches!(e, FitEvent::Step(_)) as usize)?;
    assert_eq!(n, 0);
    assert!(ExportSet::parse("ply,stl").is_err());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
