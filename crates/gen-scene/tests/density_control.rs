//! Adaptive density control: clone / split / prune counts on constructed splats, seeded
//! determinism, statistics accumulation and optimizer-state remapping.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gen_core::SeededRng;
use gen_optim::{AdamW, AdamWConfig, Optim, Optimizer};
use gen_scene::density::{
    densify_and_prune, remap_optimizer, reset_opacity, splat_param_groups, DensityConfig,
    DensityStats, PARAM_NAMES,
};
use gen_scene::splat::{SplatVars, Splats};

fn logit(p: f64) -> f64 {
    (p / (1.0 - p)).ln()
}

/// Four Gaussians: 0 small + large gradient (clone), 1 large + large gradient (split),
/// 2 transparent (prune), 3 quiet (keep), 4 huge (world-size prune).
fn case() -> Result<(Splats, DensityStats)> {
    let dev = Device::Cpu;
    let means = Tensor::new(
        &[[0.0f32, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]],
        &dev,
    )?;
    let ls = |s: f64| (s.ln()) as f32;
    let log_scales = Tensor::new(
        &[
            [ls(0.005), ls(0.004), ls(0.003)],
            [ls(0.05), ls(0.02), ls(0.01)],
            [ls(0.01); 3],
            [ls(0.01); 3],
            [ls(0.5); 3],
        ],
        &dev,
    )?;
    // Gaussian 1 rotated 90° about z: its long axis (local x) lies along world y.
    let h = std::f32::consts::FRAC_1_SQRT_2;
    let quats = Tensor::new(
        &[
            [1.0f32, 0.0, 0.0, 0.0],
            [h, 0.0, 0.0, h],
            [1.0, 0.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
        ],
        &dev,
    )?;
    let opacity_logits = Tensor::new(
        &[
            logit(0.8) as f32,
            logit(0.7) as f32,
            logit(0.001) as f32,
            logit(0.9) as f32,
            logit(0.9) as f32,
        ],
        &dev,
    )?;
    let sh = Tensor::arange(0f32, 15.0, &dev)?.reshape((5, 1, 3))?;
    let splats = Splats { means, log_scales, quats, opacity_logits, sh };
    let mut stats = DensityStats::new(5);
    // Mean gradients: 1e-3, 2e-3, 5e-3 (transparent: pruned anyway), 1e-5, 1e-3.
    stats.grad_accum = vec![2e-3, 2e-3, 5e-3, 3e-5, 1e-3];
    stats.visible = vec![2, 1, 1, 3, 1];
    stats.max_radius = vec![3.0, 8.0, 2.0, 2.0, 40.0];
    Ok((splats, stats))
}

fn cfg() -> DensityConfig {
    DensityConfig {
        grad_threshold: 2e-4,
        percent_dense: 0.01,
        min_opacity: 0.005,
        max_world_scale: Some(0.1),
        max_screen_radius: None,
        ..Default::default()
    }
}

fn rows2(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_vec2::<f32>()?)
}

#[test]
fn clone_split_prune_counts_and_values() -> Result<()> {
    let (splats, stats) = case()?;
    let d = densify_and_prune(&splats, &stats, &cfg(), 1.0, &mut SeededRng::new(3))?;
    let r = d.report;
    assert_eq!((r.before, r.cloned, r.split, r.pruned, r.after), (5, 1, 1, 2, 2 + 1 + 2));
    // Survivors first (only Gaussian 0: 1 is split, 2 and 4 pruned, 3 kept), then the clone
    // of 0, then the two samples of 1.
    assert_eq!(d.rows, vec![Some(0), Some(3), None, None, None]);
    let means = rows2(&d.splats.means)?;
    let scales = rows2(&d.splats.log_scales)?;
    let old_means = rows2(&splats.means)?;
    let old_scales = rows2(&splats.log_scales)?;
    assert_eq!(means[0], old_means[0]);
    assert_eq!(means[1], old_means[3]);
    // Clone: an exact copy.
    assert_eq!(means[2], old_means[0]);
    assert_eq!(scales[2], old_scales[0]);
    assert_eq!(d.splats.sh.to_vec3::<f32>()?[2], vec![vec![0.0, 1.0, 2.0]]);
    // Split samples: scales divided by 1.6, means scattered mostly along world y (the long
    // axis of Gaussian 1 after its rotation), colour copied.
    for j in [3, 4] {
        for a in 0..3 {
            let want = old_scales[1][a] - 1.6f32.ln();
            assert!((scales[j][a] - want).abs() < 1e-6, "scale {j},{a}");
        }
        assert_eq!(d.splats.sh.to_vec3::<f32>()?[j], vec![vec![3.0, 4.0, 5.0]]);
        assert_ne!(means[j], old_means[1]);
    }
    let spread =
        |a: usize| (means[3][a] - old_means[1][a]).abs() + (means[4][a] - old_means[1][a]).abs();
    assert!(spread(1) > spread(0), "long axis is y: {:?}", means);
    assert!(spread(1) < 0.5, "samples stay near the original: {:?}", means);
    Ok(())
}

#[test]
fn densification_is_deterministic_with_a_seed() -> Result<()> {
    let (splats, stats) = case()?;
    let run = |seed| -> Result<Vec<f32>> {
        let d = densify_and_prune(&splats, &stats, &cfg(), 1.0, &mut SeededRng::new(seed))?;
        Ok(d.splats.means.flatten_all()?.to_vec1::<f32>()?)
    };
    assert_eq!(run(9)?, run(9)?);
    assert_ne!(run(9)?, run(10)?);
    Ok(())
}

#[test]
fn thresholds_switch_the_rules() -> Result<()> {
    let (splats, stats) = case()?;
    // A high threshold: no growth, only pruning.
    let c = DensityConfig { grad_threshold: 1.0, ..cfg() };
    let r = densify_and_prune(&splats, &stats, &c, 1.0, &mut SeededRng::new(0))?.report;
    assert_eq!((r.cloned, r.split, r.pruned, r.after), (0, 0, 2, 3));
    // Larger extent: Gaussian 1 (0.05) becomes "small" and is cloned; Gaussian 4 no longer too
    // large for the world limit (0.1 * 10).
    let r = densify_and_prune(&splats, &stats, &cfg(), 10.0, &mut SeededRng::new(0))?.report;
    assert_eq!((r.cloned, r.split, r.pruned, r.after), (2, 1, 1, 3 + 2 + 2));
    // Screen-size pruning removes radius 8 and 40 too.
    let c = DensityConfig { max_screen_radius: Some(5.0), max_world_scale: None, ..cfg() };
    let r = densify_and_prune(&splats, &stats, &c, 1.0, &mut SeededRng::new(0))?.report;
    assert_eq!((r.cloned, r.split, r.pruned), (1, 0, 3));
    // A cap on the count keeps the largest gradients: 3 unpruned and a cap of 4 leave room
    // for one more Gaussian: the split of 1 (gradient 2e-3, adds one) wins over the clone of 0.
    let c = DensityConfig { max_gaussians: 4, ..cfg() };
    let r = densify_and_prune(&splats, &stats, &c, 1.0, &mut SeededRng::new(0))?.report;
    assert_eq!((r.cloned, r.split, r.after), (0, 1, 4));
    Ok(())
}

#[test]
fn stats_accumulate_visible_gradients_in_ndc_units() -> Result<()> {
    let dev = Device::Cpu;
    let mut s = DensityStats::new(3);
    let mut g = vec![0f32; 24];
    g[0] = 3.0; // Gaussian 0: (3, 4) px-gradient
    g[1] = 4.0;
    g[8] = 1.0; // Gaussian 1: invisible (radius 0), ignored
    g[16] = 0.5; // Gaussian 2
    let grad = Tensor::from_vec(g, (3, 8), &dev)?;
    let radii = Tensor::new(&[2f32, 0.0, 5.0], &dev)?;
    s.accumulate(&grad, &radii, 20, 40)?;
    s.accumulate(&grad, &radii, 20, 40)?;
    // NDC scale: (W/2, H/2) = (10, 20): |(30, 80)| = 85.44.
    let want0 = (30f64 * 30.0 + 80.0 * 80.0).sqrt();
    let m = s.mean_grad();
    assert!((m[0] - want0).abs() < 1e-4, "{m:?}");
    assert_eq!(m[1], 0.0);
    assert!((m[2] - 5.0).abs() < 1e-6);
    assert_eq!(s.visible, vec![2, 0, 2]);
    assert_eq!(s.max_radius, vec![2.0, 0.0, 5.0]);
    // Wrong shapes are errors, not panics.
    assert!(s.accumulate(&grad.narrow(0, 0, 2)?, &radii, 20, 40).is_err());
    Ok(())
}

#[test]
fn optimizer_state_follows_the_gaussians() -> Result<()> {
    let (splats, stats) = case()?;
    let vars = SplatVars::new(&splats)?;
    let lrs = [1e-3, 5e-3, 1e-3, 5e-2, 1e-2];
    let configs = lrs.map(|lr| AdamWConfig { lr, weight_decay: 0.0, ..Default::default() });
    let mut opt = Optim::new(AdamW, splat_param_groups(&vars, configs))?;
    // Two steps with a gradient that differs per row.
    for _ in 0..2 {
        let s = vars.splats();
        let w = Tensor::arange(1f32, 6.0, &Device::Cpu)?;
        let loss = (s.means.sum(1)?.mul(&w)?.sum_all()?
            + s.log_scales.sum(1)?.mul(&w)?.sum_all()?
            + s.quats.sum(1)?.mul(&w)?.sum_all()?
            + s.opacity_logits.mul(&w)?.sum_all()?
            + s.sh.flatten_from(1)?.sum(1)?.mul(&w)?.sum_all()?)?;
        opt.step(&loss.backward()?)?;
    }
    let d = densify_and_prune(&vars.splats(), &stats, &cfg(), 1.0, &mut SeededRng::new(1))?;
    let new_vars = SplatVars::new(&d.splats)?;
    let new_opt = remap_optimizer(&opt, &new_vars, &d.rows, &["opacity_logits"])?;
    assert_eq!(new_opt.lrs(), lrs.to_vec());
    assert_eq!(new_opt.step_count(), 2);
    for name in PARAM_NAMES {
        let old = opt.param_state(name).unwrap();
        let new = new_opt.param_state(name).unwrap();
        assert_eq!(new.step, 2);
        for slot in ["exp_avg", "exp_avg_sq"] {
            let rows = |t: &Tensor| -> Result<Vec<Vec<f32>>> {
                Ok(t.reshape((t.dim(0)?, ()))?.to_vec2::<f32>()?)
            };
            let o = rows(old.get(slot).unwrap())?;
            let n = rows(new.get(slot).unwrap())?;
            assert_eq!(n.len(), d.rows.len());
            for (j, r) in d.rows.iter().enumerate() {
                match r {
                    Some(i) if name != "opacity_logits" => {
                        assert_eq!(n[j], o[*i], "{name}.{slot} row {j}")
                    }
                    _ => {
                        assert!(n[j].iter().all(|&v| v == 0.0), "{name}.{slot} row {j} not zeroed")
                    }
                }
                if r.is_some() && name != "opacity_logits" {
                    assert!(o[r.unwrap()].iter().any(|&v| v != 0.0));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn opacity_reset_caps_opacity() -> Result<()> {
    let (splats, _) = case()?;
    let r = reset_opacity(&splats, 0.01)?;
    let p: Vec<f64> = r
        .opacity_logits
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .iter()
        .map(|x| 1.0 / (1.0 + (-x).exp()))
        .collect();
    assert!((p[0] - 0.01).abs() < 1e-6 && (p[3] - 0.01).abs() < 1e-6);
    assert!((p[2] - 0.001).abs() < 1e-6, "below the cap stays: {p:?}");
    assert!(reset_opacity(&splats, 1.5).is_err());
    Ok(())
}

#[test]
fn size_pruning_waits_for_opacity_resets_and_zero_caps_are_refused() -> Result<()> {
    let c = DensityConfig { opacity_reset_interval: 0, ..cfg() };
    assert!(!c.size_pruning_now(1) && !c.size_pruning_now(1_000_000));
    let c = DensityConfig { opacity_reset_interval: 300, ..cfg() };
    assert!(!c.size_pruning_now(300) && c.size_pruning_now(301));
    let e = DensityConfig { max_gaussians: 0, ..cfg() }.validate().unwrap_err().to_string();
    assert!(e.contains("max_gaussians"), "{e}");
    Ok(())
}

#[test]
fn the_strategy_prunes_oversized_gaussians_only_after_a_reset() -> Result<()> {
    use gen_scene::density::{AdaptiveDensity, DensityStrategy, RenderInfo, SplatParams};
    let (splats, _) = case()?;
    for (reset_every, step, huge_kept) in [(0, 10, true), (5, 10, false)] {
        let dcfg = DensityConfig {
            densify_from: 10,
            densify_until: 10,
            interval: 10,
            opacity_reset_interval: reset_every,
            ..cfg()
        };
        let mut s = AdaptiveDensity::new(dcfg, 1.0, 0, splats.len())?;
        let vars = SplatVars::new(&splats)?;
        let c = AdamWConfig { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-15, weight_decay: 0.0 };
        let opt = Optim::new(AdamW, splat_param_groups(&vars, [(); 5].map(|_| c.clone())))?;
        let mut params = SplatParams { vars, opt };
        let probe = s.step_pre_backward(splats.len(), DType::F32, &Device::Cpu)?.unwrap();
        // Zero probe gradient: nothing grows; only the prune rules act.
        let loss = probe.as_tensor().sqr()?.sum_all()?;
        let grads = loss.backward()?;
        let radii = Tensor::new(&[3f32, 8.0, 2.0, 2.0, 40.0], &Device::Cpu)?;
        let info = RenderInfo {
            step,
            grads: &grads,
            probe: Some(&probe),
            radii: &radii,
            width: 16,
            height: 16,
        };
        let r = s.step_post_backward(&mut params, &info)?;
        let d = r.density.expect("densified at step 10");
        // Gaussian 2 is transparent (always pruned); 4 is larger than a tenth of the extent.
        assert_eq!(d.pruned, if huge_kept { 1 } else { 2 }, "reset every {reset_every}");
        assert_eq!(params.len(), if huge_kept { 4 } else { 3 });
    }
    Ok(())
}
