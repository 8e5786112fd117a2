//! Finite-difference gradient checks: guidance and scheduler steps are differentiable tensor
//! code (reward fine-tuning backpropagates through guided sampling steps).

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gen_core::SeededRng;
use gen_diffusion::prediction::{to_eps, to_v, to_x0};
use gen_diffusion::{
    Apg, ApgConfig, ApgFormulation, Cfg, Guidance, PredictionType, Predictions, Rescale, Scheduler,
    SchedulerConfig, SchedulerKind, Space, StepInfo,
};

const SHAPE: (usize, usize, usize, usize) = (2, 2, 2, 3);

/// Compares d(sum(f(x) * seed))/dx from candle's backward with central differences.
fn fd_check(name: &str, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Result<f64> {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts)?;
    let seed = SeededRng::new(99).randn(out.shape(), DType::F64, &Device::Cpu)?;
    let loss = (&out * &seed)?.sum_all()?;
    let grads = loss.backward()?;
    let eval =
        |xs: &[Tensor]| -> Result<f64> { Ok((f(xs)? * &seed)?.sum_all()?.to_scalar::<f64>()?) };
    let h = 1e-6;
    let mut worst = 0.0f64;
    for (k, v) in vars.iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("{name}: no gradient for input {k}"))?;
        let g: Vec<f64> = g.flatten_all()?.to_vec1()?;
        let base: Vec<f64> = inputs[k].flatten_all()?.to_vec1()?;
        for i in 0..base.len() {
            let mut xs: Vec<Tensor> = inputs.to_vec();
            let mut p = base.clone();
            p[i] += h;
            xs[k] = Tensor::from_vec(p.clone(), inputs[k].shape(), &Device::Cpu)?;
            let lp = eval(&xs)?;
            p[i] -= 2.0 * h;
            xs[k] = Tensor::from_vec(p, inputs[k].shape(), &Device::Cpu)?;
            let lm = eval(&xs)?;
            let fd = (lp - lm) / (2.0 * h);
            let err = (fd - g[i]).abs() / fd.abs().max(g[i].abs()).max(1.0);
            worst = worst.max(err);
        }
    }
    println!("{name:32} max FD relative error {worst:.2e}");
    assert!(worst < 1e-6, "{name}: FD error {worst:e}");
    Ok(worst)
}

fn randn(seed: u64, scale: f64) -> Tensor {
    (SeededRng::new(seed).randn(SHAPE, DType::F64, &Device::Cpu).unwrap() * scale).unwrap()
}

fn preds(c: &Tensor, u: &Tensor, x: &Tensor, kind: PredictionType) -> Predictions {
    Predictions {
        cond: c.clone(),
        uncond: Some(u.clone()),
        x_t: x.clone(),
        alpha_cumprod: vec![0.4, 0.8],
        prediction_type: kind,
    }
}

const STEP: StepInfo = StepInfo { step: Some((0, 1)), timestep: 500.0, sigma: 1.0 };

#[test]
fn guidance_gradients_match_finite_differences() -> Result<()> {
    let c = randn(1, 1.0);
    // sample 0: large difference (norm threshold active), sample 1: small
    let u =
        (&c - Tensor::cat(&[randn(2, 3.0).narrow(0, 0, 1)?, randn(3, 0.2).narrow(0, 1, 1)?], 0)?)?;
    let x = randn(4, 1.0);
    fd_check("cfg", &[c.clone(), u.clone()], &|t| {
        Ok(Cfg::new(5.0)?.combine(&preds(&t[0], &t[1], &x, PredictionType::Epsilon), &STEP)?.value)
    })?;
    let apg = |f: ApgFormulation, r: f64, space: Space| ApgConfig {
        scale: 6.0,
        eta: 0.3,
        norm_threshold: r,
        momentum: 0.0,
        formulation: f,
        space,
    };
    fd_check("apg paper r=2 (model output)", &[c.clone(), u.clone()], &|t| {
        Ok(Apg::new(apg(ApgFormulation::Paper, 2.0, Space::ModelOutput))?.guide(&t[0], &t[1])?)
    })?;
    fd_check("apg diffusers r=2", &[c.clone(), u.clone()], &|t| {
        Ok(Apg::new(apg(ApgFormulation::Diffusers, 2.0, Space::ModelOutput))?
            .guide(&t[0], &t[1])?)
    })?;
    fd_check("apg paper x0 space, eps model", &[c.clone(), u.clone(), x.clone()], &|t| {
        let mut g = Apg::new(apg(ApgFormulation::Paper, 2.0, Space::X0))?;
        let p = preds(&t[0], &t[1], &t[2], PredictionType::Epsilon);
        let out = g.combine(&p, &STEP)?;
        Ok(p.to_space(&out.value, out.space, Space::ModelOutput)?)
    })?;
    // momentum: the second step depends on both steps' inputs
    let c2 = randn(5, 1.0);
    let u2 = (&c2 - randn(6, 1.0))?;
    fd_check("apg momentum, 2 steps", &[c.clone(), u.clone(), c2.clone(), u2.clone()], &|t| {
        let mut g = Apg::new(ApgConfig {
            momentum: -0.5,
            ..apg(ApgFormulation::Paper, 3.0, Space::ModelOutput)
        })?;
        g.guide(&t[0], &t[1])?;
        Ok(g.guide(&t[2], &t[3])?)
    })?;
    fd_check("cfg-rescale 0.7", &[c.clone(), u.clone()], &|t| {
        Ok(Rescale::cfg(4.0, 0.7)?
            .combine(&preds(&t[0], &t[1], &x, PredictionType::VPrediction), &STEP)?
            .value)
    })?;
    Ok(())
}

#[test]
fn conversion_and_step_gradients_match_finite_differences() -> Result<()> {
    let p = randn(7, 1.0);
    let x = randn(8, 1.0);
    let a = [0.3, 0.9];
    for kind in [PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample] {
        fd_check(&format!("to_x0/to_eps/to_v {kind:?}"), &[p.clone(), x.clone()], &|t| {
            let x0 = to_x0(&t[0], &t[1], &a, kind)?;
            let e = to_eps(&t[0], &t[1], &a, kind)?;
            let v = to_v(&t[0], &t[1], &a, kind)?;
            Ok(((x0 + (e * 0.5)?)? + (v * 0.25)?)?)
        })?;
    }
    // One step of each scheduler, through the whole step (DPM-Solver: its second-order step).
    for kind in SchedulerKind::ALL {
        let mut cfg = SchedulerConfig::stable_diffusion(kind);
        cfg.eta = if kind == SchedulerKind::Ddim { 0.5 } else { 0.0 };
        let noise = randn(9, 1.0);
        fd_check(&format!("{} step", kind.short_name()), &[p.clone(), x.clone()], &|t| {
            let mut s: Box<dyn Scheduler> = cfg.build()?;
            s.set_timesteps(10, None)?;
            let ts = s.timesteps().to_vec();
            let z = if s.needs_noise(ts[0]) { Some(&noise) } else { None };
            let first = s.step_with_noise(&t[0], ts[0], &t[1], z)?;
            let z = if s.needs_noise(ts[1]) { Some(&noise) } else { None };
            let out = s.step_with_noise(&(&t[0] * 0.5)?, ts[1], &first.prev_sample, z)?;
            Ok((out.prev_sample + out.pred_original_sample)?)
        })?;
    }
    Ok(())
}
