//! Hand-computed guidance cases: CFG, APG projection / norm threshold / momentum / formulations,
//! APG(eta=1, r=0, no momentum) = CFG, CFG-rescale, intervals, x0-space conversion.

use anyhow::Result;
use candle_core::{Device, Tensor};
use gen_diffusion::prediction::{to_eps, to_x0};
use gen_diffusion::{
    Apg, ApgConfig, ApgFormulation, Branch, Cfg, Guidance, Interval, IntervalRange, NoGuidance,
    PredictionType, Predictions, Rescale, Space, StepInfo,
};

fn t(rows: &[&[f64]]) -> Tensor {
    let b = rows.len();
    let n = rows[0].len();
    let v: Vec<f64> = rows.iter().flat_map(|r| r.iter().cloned()).collect();
    Tensor::from_vec(v, (b, n), &Device::Cpu).unwrap()
}

fn vals(x: &Tensor) -> Vec<f64> {
    x.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap()
}

fn close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
    }
}

fn step(k: usize, n: usize) -> StepInfo {
    StepInfo {
        step: Some((k, n)),
        timestep: 900.0 - 100.0 * k as f64,
        sigma: 10.0 / (k + 1) as f64,
    }
}

fn preds(c: Tensor, u: Option<Tensor>, kind: PredictionType) -> Predictions {
    let b = c.dim(0).unwrap();
    Predictions {
        x_t: c.zeros_like().unwrap(),
        cond: c,
        uncond: u,
        alpha_cumprod: vec![0.5; b],
        prediction_type: kind,
    }
}

fn apg(scale: f64, eta: f64, r: f64, beta: f64, formulation: ApgFormulation) -> Apg {
    Apg::new(ApgConfig {
        scale,
        eta,
        norm_threshold: r,
        momentum: beta,
        formulation,
        space: Space::ModelOutput,
    })
    .unwrap()
}

#[test]
fn cfg_is_u_plus_w_c_minus_u_and_w1_skips_uncond() -> Result<()> {
    let mut g = Cfg::new(3.0)?;
    let out = g.combine(
        &preds(t(&[&[1.0, 2.0]]), Some(t(&[&[0.5, -1.0]])), PredictionType::Epsilon),
        &step(0, 1),
    )?;
    // 0.5 + 3*(0.5) = 2.0 ; -1 + 3*3 = 8
    close(&vals(&out.value), &[2.0, 8.0], 1e-12);
    assert_eq!(Cfg::new(1.0)?.branches(&step(0, 1)), vec![Branch::Cond]);
    assert_eq!(g.branches(&step(0, 1)), vec![Branch::Cond, Branch::Uncond]);
    assert_eq!(NoGuidance.branches(&step(0, 1)), vec![Branch::Cond]);
    assert!(Cfg::new(f64::NAN).is_err());
    Ok(())
}

#[test]
fn apg_projection_by_hand() -> Result<()> {
    // c = (1, 0), delta = c - u = (3, 4): par = (3, 0), orth = (0, 4).
    let c = t(&[&[1.0, 0.0]]);
    let u = t(&[&[-2.0, -4.0]]);
    // paper, eta 0, w 2: c + 1 * (0, 4) = (1, 4)
    close(
        &vals(&apg(2.0, 0.0, 0.0, 0.0, ApgFormulation::Paper).guide(&c, &u)?),
        &[1.0, 4.0],
        1e-12,
    );
    // eta 0.5: update (1.5, 4); paper w 3: c + 2*update = (4, 8)
    close(
        &vals(&apg(3.0, 0.5, 0.0, 0.0, ApgFormulation::Paper).guide(&c, &u)?),
        &[4.0, 8.0],
        1e-12,
    );
    // diffusers: u + w update, eta 0, w 2: (-2, -4) + 2*(0, 4) = (-2, 4)
    close(
        &vals(&apg(2.0, 0.0, 0.0, 0.0, ApgFormulation::Diffusers).guide(&c, &u)?),
        &[-2.0, 4.0],
        1e-12,
    );
    // c + w update (diffusers original / ComfyUI), eta 1, w 2: (1,0) + 2*(3,4) = (7, 8)
    close(
        &vals(&apg(2.0, 1.0, 0.0, 0.0, ApgFormulation::CondPlusW).guide(&c, &u)?),
        &[7.0, 8.0],
        1e-12,
    );
    // projection is per sample: second sample c = (0, 2), delta = (3, 4): par = (0, 4), orth = (3, 0)
    let c2 = t(&[&[1.0, 0.0], &[0.0, 2.0]]);
    let u2 = t(&[&[-2.0, -4.0], &[-3.0, -2.0]]);
    close(
        &vals(&apg(2.0, 0.0, 0.0, 0.0, ApgFormulation::Paper).guide(&c2, &u2)?),
        &[1.0, 4.0, 3.0, 2.0],
        1e-12,
    );
    Ok(())
}

#[test]
fn apg_norm_threshold_by_hand() -> Result<()> {
    // delta = (3, 4), ||delta|| = 5; r = 1 -> (0.6, 0.8); c = (1, 0); eta 1; paper w 3: c + 2*(0.6, 0.8)
    let c = t(&[&[1.0, 0.0], &[1.0, 0.0]]);
    let u = t(&[&[-2.0, -4.0], &[0.7, -0.4]]); // second sample delta (0.3, 0.4), norm 0.5 < r: unchanged
    let out = apg(3.0, 1.0, 1.0, 0.0, ApgFormulation::Paper).guide(&c, &u)?;
    close(&vals(&out), &[2.2, 1.6, 1.6, 0.8], 1e-12);
    Ok(())
}

#[test]
fn apg_momentum_accumulates_and_resets() -> Result<()> {
    // beta = -0.5, eta 1, r 0, paper w 2 -> out = c + m.
    let mut g = apg(2.0, 1.0, 0.0, -0.5, ApgFormulation::Paper);
    let c = t(&[&[0.0, 1.0]]);
    let u1 = t(&[&[-3.0, -3.0]]); // delta1 = (3, 4)
    let u2 = t(&[&[-1.0, 1.0]]); // delta2 = (1, 0)
    let p1 = preds(c.clone(), Some(u1.clone()), PredictionType::Sample);
    let p2 = preds(c.clone(), Some(u2), PredictionType::Sample);
    let o1 = g.combine(&p1, &step(0, 3))?;
    close(&vals(&o1.value), &[3.0, 5.0], 1e-12);
    // m2 = (1, 0) - 0.5 * (3, 4) = (-0.5, -2)
    let o2 = g.combine(&p2, &step(1, 3))?;
    close(&vals(&o2.value), &[-0.5, -1.0], 1e-12);
    // a new trajectory (step 0 again) starts from zero momentum
    let o3 = g.combine(&p1, &step(0, 3))?;
    close(&vals(&o3.value), &[3.0, 5.0], 1e-12);
    // explicit reset too
    g.combine(&p2, &step(1, 3))?;
    g.reset();
    let o4 = g.combine(&p1, &StepInfo { step: None, timestep: 500.0, sigma: 1.0 })?;
    close(&vals(&o4.value), &[3.0, 5.0], 1e-12);
    // ComfyUI rule: the noise level going up means a new trajectory
    let o5 = g.combine(&p1, &StepInfo { step: None, timestep: 900.0, sigma: 5.0 })?;
    close(&vals(&o5.value), &[3.0, 5.0], 1e-12);
    Ok(())
}

#[test]
fn apg_eta1_r0_no_momentum_equals_cfg() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = gen_core::SeededRng::new(3);
    let c = rng.randn((3, 4, 5, 5), candle_core::DType::F64, &dev)?;
    let u = rng.randn((3, 4, 5, 5), candle_core::DType::F64, &dev)?;
    for w in [1.5, 4.0, 12.0] {
        let apg_out = apg(w, 1.0, 0.0, 0.0, ApgFormulation::Paper).guide(&c, &u)?;
        let cfg_out = (&u + ((&c - &u)? * w)?)?;
        let err = vals(&(apg_out - cfg_out)?).iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(err < 1e-12, "w {w}: {err:e}");
    }
    // In x0 space on eps predictions (the paper's setting), converted back: still CFG on eps,
    // because the eps <-> x0 map is affine with weights summing to 1.
    let x_t = rng.randn((3, 4, 5, 5), candle_core::DType::F64, &dev)?;
    let a = vec![0.3, 0.7, 0.95];
    let p = Predictions {
        cond: c.clone(),
        uncond: Some(u.clone()),
        x_t: x_t.clone(),
        alpha_cumprod: a.clone(),
        prediction_type: PredictionType::Epsilon,
    };
    let mut g = Apg::new(ApgConfig {
        scale: 5.0,
        eta: 1.0,
        norm_threshold: 0.0,
        momentum: 0.0,
        formulation: ApgFormulation::Paper,
        space: Space::X0,
    })?;
    let out = g.combine(&p, &step(0, 1))?;
    assert_eq!(out.space, Space::X0);
    let eps = to_eps(&out.value, &x_t, &a, PredictionType::Sample)?;
    let cfg_eps = (&u + ((&c - &u)? * 5.0)?)?;
    let err = vals(&(eps - cfg_eps)?).iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(err < 1e-10, "{err:e}");
    // and the x0 it produced is the guided x0 of the branches
    let x0c = to_x0(&c, &x_t, &a, PredictionType::Epsilon)?;
    let x0u = to_x0(&u, &x_t, &a, PredictionType::Epsilon)?;
    let want = (&x0u + ((&x0c - &x0u)? * 5.0)?)?;
    let err = vals(&(out.value - want)?).iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(err < 1e-10, "{err:e}");
    Ok(())
}

#[test]
fn apg_default_is_paper_and_rejects_bad_values() {
    let d = ApgConfig::paper(7.0);
    assert_eq!(
        (d.eta, d.norm_threshold, d.momentum, d.formulation, d.space),
        (0.0, 15.0, -0.5, ApgFormulation::Paper, Space::X0)
    );
    assert!(Apg::new(ApgConfig { momentum: 1.0, ..d.clone() }).is_err());
    assert!(Apg::new(ApgConfig { norm_threshold: -1.0, ..d.clone() }).is_err());
    // w = 1 (paper/diffusers) and w = 0 (c + w update) need no unconditional branch
    assert_eq!(Apg::new(ApgConfig::paper(1.0)).unwrap().branches(&step(0, 1)), vec![Branch::Cond]);
    assert_eq!(Apg::new(ApgConfig::comfy(0.0)).unwrap().branches(&step(0, 1)), vec![Branch::Cond]);
    assert_eq!(Apg::new(ApgConfig::comfy(1.0)).unwrap().branches(&step(0, 1)).len(), 2);
}

#[test]
fn cfg_rescale_by_hand() -> Result<()> {
    // c = (1, 3): std 1; u = (1, 1); w 2: x = (1, 5), std 2; x_r = (0.5, 2.5);
    // phi 0.7: 0.7 x_r + 0.3 x = (0.65, 3.25)
    let mut g = Rescale::cfg(2.0, 0.7)?;
    let out = g.combine(
        &preds(t(&[&[1.0, 3.0]]), Some(t(&[&[1.0, 1.0]])), PredictionType::Epsilon),
        &step(0, 1),
    )?;
    close(&vals(&out.value), &[0.65, 3.25], 1e-12);
    assert!(Rescale::cfg(2.0, 1.5).is_err());
    // phi = 0 is plain CFG
    let mut g0 = Rescale::cfg(2.0, 0.0)?;
    let out0 = g0.combine(
        &preds(t(&[&[1.0, 3.0]]), Some(t(&[&[1.0, 1.0]])), PredictionType::Epsilon),
        &step(0, 1),
    )?;
    close(&vals(&out0.value), &[1.0, 5.0], 1e-12);
    Ok(())
}

#[test]
fn intervals_switch_guidance_on_and_off() -> Result<()> {
    let c = t(&[&[1.0, 2.0]]);
    let u = t(&[&[0.0, 0.0]]);
    // step fraction [0.25, 0.75) of 8 steps: steps 2..=5
    let mut g =
        Interval::new(Cfg::new(3.0)?, IntervalRange::StepFraction { start: 0.25, stop: 0.75 })?;
    for k in 0..8 {
        let on = (2..6).contains(&k);
        assert_eq!(g.branches(&step(k, 8)).len(), if on { 2 } else { 1 }, "step {k}");
        let p = preds(c.clone(), if on { Some(u.clone()) } else { None }, PredictionType::Epsilon);
        let out = g.combine(&p, &step(k, 8))?;
        close(&vals(&out.value), if on { &[3.0, 6.0] } else { &[1.0, 2.0] }, 1e-12);
    }
    // sigma range (lo, hi]
    let g2 = Interval::new(Cfg::new(3.0)?, IntervalRange::Sigma { lo: 0.5, hi: 2.0 })?;
    let at = |s: f64| StepInfo { step: None, timestep: 0.0, sigma: s };
    assert_eq!(g2.branches(&at(2.0)).len(), 2);
    assert_eq!(g2.branches(&at(0.5)).len(), 1);
    assert_eq!(g2.branches(&at(3.0)).len(), 1);
    // timestep range [lo, hi]
    let g3 = Interval::new(Cfg::new(3.0)?, IntervalRange::Timestep { lo: 100.0, hi: 600.0 })?;
    let tt = |t: f64| StepInfo { step: None, timestep: t, sigma: 1.0 };
    assert_eq!(g3.branches(&tt(100.0)).len(), 2);
    assert_eq!(g3.branches(&tt(601.0)).len(), 1);
    // a step-fraction interval without step index is an error, not a silent choice
    let mut g4 =
        Interval::new(Cfg::new(3.0)?, IntervalRange::StepFraction { start: 0.0, stop: 0.5 })?;
    assert!(g4
        .combine(&preds(c.clone(), Some(u.clone()), PredictionType::Epsilon), &tt(10.0))
        .is_err());
    assert!(Interval::new(Cfg::new(3.0)?, IntervalRange::Sigma { lo: 2.0, hi: 1.0 }).is_err());
    Ok(())
}

#[test]
fn guidance_config_builds_the_composition() -> Result<()> {
    let json = r#"{"method": "apg", "scale": 5.0, "eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5,
                   "formulation": "paper", "space": "x0", "rescale_phi": 0.7,
                   "interval": {"step_fraction": {"start": 0.0, "stop": 0.5}}}"#;
    let cfg: gen_diffusion::GuidanceConfig = serde_json::from_str(json)?;
    assert_eq!(
        cfg.method,
        gen_diffusion::GuidanceMethod::Apg(ApgConfig { scale: 5.0, ..ApgConfig::paper(5.0) })
    );
    let g = cfg.build()?;
    assert!(
        g.name().starts_with("interval(") && g.name().contains("rescale(phi=0.7, apg("),
        "{}",
        g.name()
    );
    assert_eq!(g.branches(&step(3, 4)), vec![Branch::Cond]);
    assert_eq!(g.branches(&step(1, 4)).len(), 2);
    let back: gen_diffusion::GuidanceConfig = serde_json::from_str(&serde_json::to_string(&cfg)?)?;
    assert_eq!(back, cfg);
    // CFG from config equals Cfg
    let mut a = gen_diffusion::GuidanceConfig::cfg(3.0).build()?;
    let p = preds(t(&[&[1.0, 2.0]]), Some(t(&[&[0.5, -1.0]])), PredictionType::Epsilon);
    close(&vals(&a.combine(&p, &step(0, 1))?.value), &[2.0, 8.0], 1e-12);
    let bad: gen_diffusion::GuidanceConfig =
        serde_json::from_str(r#"{"method": "none", "rescale_phi": 0.5}"#)?;
    assert!(bad.build().is_err());
    Ok(())
}

#[test]
fn interval_parses_and_prints_back() -> Result<()> {
    use gen_diffusion::IntervalRange;
    for (text, want) in [
        ("0.2,0.8", IntervalRange::StepFraction { start: 0.2, stop: 0.8 }),
        ("steps:0.5,1", IntervalRange::StepFraction { start: 0.5, stop: 1.0 }),
        ("sigma:0.28,5.42", IntervalRange::Sigma { lo: 0.28, hi: 5.42 }),
        ("t: 100 , 900", IntervalRange::Timestep { lo: 100.0, hi: 900.0 }),
    ] {
        let r = IntervalRange::parse(text)?;
        assert_eq!(r, want, "{text}");
        assert_eq!(IntervalRange::parse(&r.to_string())?, r, "{r}");
    }
    for (bad, says) in [
        ("0.8,0.2", "0.8,0.2"),
        ("1.5,2", "0 <= a <= b <= 1"),
        ("x:1,2", "unknown interval kind `x`"),
        ("sigma:5,1", "not ordered"),
        ("0.5", "expected a,b"),
        ("0.5,late", "`late`"),
    ] {
        let e = IntervalRange::parse(bad).unwrap_err().to_string();
        assert!(e.contains(says) && e.contains("guidance interval"), "{bad}: {e}");
    }
    Ok(())
}

#[test]
fn apg_norm_threshold_scales_with_the_latent_size() {
    // SDXL's own latent keeps r; the embedded model's 4×16×16 latent has 1/64 of the values,
    // so r shrinks by sqrt(64) = 8; SD 1.5's 4×64×64 by 2.
    assert_eq!(ApgConfig::norm_threshold_for_latent(15.0, 4 * 128 * 128), 15.0);
    assert_eq!(ApgConfig::norm_threshold_for_latent(15.0, 4 * 16 * 16), 1.875);
    assert_eq!(ApgConfig::norm_threshold_for_latent(5.0, 4 * 64 * 64), 2.5);
}
