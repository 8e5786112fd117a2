//! End-to-end sampling with an analytic denoiser. The data is Gaussian N(mu, s^2 I) per
//! condition, so the exact denoiser is known in closed form:
//! `E[x0 | x_t] = mu + sqrt(a) s^2 / (a s^2 + 1 - a) (x_t - sqrt(a) mu)`.
//! Deterministic samplers must follow the probability-flow ODE, which keeps the standardised
//! coordinate `(x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a)` constant; stochastic ones must end
//! with the data distribution. With s = 0 (point masses) guidance results are exact.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gen_core::SeededRng;
use gen_diffusion::{
    sample, start_from_noise, Apg, ApgConfig, ApgFormulation, Cfg, Conditions, Denoiser, Interval,
    IntervalRange, NoGuidance, NoiseSource, PredictionType, Scheduler, SchedulerConfig,
    SchedulerKind, Space,
};

/// Exact denoiser for N(mu, s^2) data under a VP schedule given by its training alphas.
struct Gaussian {
    log_sigmas: Vec<f64>,
    s: f64,
    kind: PredictionType,
}

impl Gaussian {
    fn new(sched: &dyn Scheduler, s: f64, kind: PredictionType) -> Self {
        let log_sigmas =
            sched.alphas_cumprod().iter().map(|a| (((1.0 - a) / a).sqrt()).ln()).collect();
        Self { log_sigmas, s, kind }
    }
    /// Cumulative alpha at a (possibly fractional) training timestep: log-sigma interpolation.
    fn alpha(&self, t: f64) -> f64 {
        let i = (t.floor() as usize).min(self.log_sigmas.len() - 2);
        let w = t - i as f64;
        let ls = self.log_sigmas[i] * (1.0 - w) + self.log_sigmas[i + 1] * w;
        1.0 / (1.0 + (2.0 * ls).exp())
    }
}

impl Denoiser for Gaussian {
    /// Data mean, same shape as one sample (1, C, H, W).
    type Cond = Tensor;
    fn prediction_type(&self) -> PredictionType {
        self.kind
    }
    fn predict(
        &self,
        x: &Tensor,
        timesteps: &[f64],
        conds: &[&Tensor],
    ) -> gen_core::Result<Vec<Tensor>> {
        let a = self.alpha(timesteps[0]);
        assert!(timesteps.iter().all(|&t| t == timesteps[0]));
        let (sa, sb, s2) = (a.sqrt(), (1.0 - a).sqrt(), self.s * self.s);
        let k = sa * s2 / (a * s2 + 1.0 - a);
        conds
            .iter()
            .map(|mu| {
                let mu = mu.broadcast_as(x.shape())?.to_dtype(x.dtype())?;
                let x0 = (&mu + ((x - (&mu * sa)?)? * k)?)?;
                let eps = ((x - (&x0 * sa)?)? * (1.0 / sb))?;
                Ok(match self.kind {
                    PredictionType::Epsilon => eps,
                    PredictionType::Sample => x0,
                    PredictionType::VPrediction => ((&eps * sa)? - (&x0 * sb)?)?,
                })
            })
            .collect()
    }
}

fn mean_tensor(shape: (usize, usize, usize), phase: f64) -> Tensor {
    let n = shape.0 * shape.1 * shape.2;
    let v: Vec<f32> = (0..n).map(|i| (0.7 * (i as f64 + phase).sin()) as f32).collect();
    Tensor::from_vec(v, (1, shape.0, shape.1, shape.2), &Device::Cpu).unwrap()
}

fn v(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
}

fn sd(kind: SchedulerKind) -> SchedulerConfig {
    SchedulerConfig::stable_diffusion(kind)
}

/// Runs a deterministic sampler on N(mu, s^2) data and returns the max deviation from the
/// exact probability-flow solution at the last model timestep followed by the exact final
/// step (the last step of every sampler jumps with the denoised estimate, which is not the
/// ODE endpoint; comparing after it isolates the solver's discretisation error).
fn ode_error(
    cfg: SchedulerConfig,
    kind: SchedulerKind,
    steps: usize,
    model_kind: PredictionType,
) -> Result<f64> {
    let mut sched = cfg.build_as(kind)?;
    sched.set_timesteps(steps, None)?;
    let s = 0.5;
    let den = Gaussian::new(sched.as_ref(), s, model_kind);
    let mu = mean_tensor((1, 8, 8), 0.0);
    let noise = SeededRng::new(11).randn((2, 1, 8, 8), DType::F64, &Device::Cpu)?;
    let x_t = start_from_noise(sched.as_ref(), &noise)?;
    let conds = Conditions { cond: mu.to_dtype(DType::F64)?, uncond: None };
    let ts = sched.timesteps().to_vec();
    let a_t = sched.model_alpha_cumprod(ts[0])?;
    let a_l = sched.model_alpha_cumprod(ts[ts.len() - 1])?;
    let sig_f = *sched.sigmas().last().unwrap();
    let a_f = 1.0 / (1.0 + sig_f * sig_f);
    let ve = sched.init_noise_sigma() > 1.0;
    let mut calls = 0;
    let out = sample(
        &den,
        sched.as_mut(),
        &mut NoGuidance,
        &x_t,
        &conds,
        &mut NoiseSource::Batch(&mut SeededRng::new(0)),
        &mut |_| calls += 1,
    )?;
    assert_eq!(calls, steps);
    let mu_b = mu.to_dtype(DType::F64)?.broadcast_as(x_t.shape())?.contiguous()?;
    // standardised start (VE samples are x_vp * sqrt(1 + sigma^2))
    let x_vp = if ve { (&x_t * a_t.sqrt())? } else { x_t.clone() };
    let z = ((&x_vp - (&mu_b * a_t.sqrt())?)? * (1.0 / (a_t * s * s + 1.0 - a_t).sqrt()))?;
    // exact ODE state at the last model timestep, its exact x0 / eps, and the final step
    let x_l = ((&mu_b * a_l.sqrt())? + (&z * (a_l * s * s + 1.0 - a_l).sqrt())?)?;
    let x0_l = (&mu_b
        + ((&x_l - (&mu_b * a_l.sqrt())?)? * (a_l.sqrt() * s * s / (a_l * s * s + 1.0 - a_l)))?)?;
    let eps_l = ((&x_l - (&x0_l * a_l.sqrt())?)? * (1.0 / (1.0 - a_l).sqrt()))?;
    let expect_vp = ((&x0_l * a_f.sqrt())? + (&eps_l * (1.0 - a_f).sqrt())?)?;
    let expect = if ve { (expect_vp * (1.0 + sig_f * sig_f).sqrt())? } else { expect_vp };
    Ok(max_abs_diff(&v(&out), &v(&expect)))
}

#[test]
fn deterministic_samplers_follow_the_probability_flow_ode() -> Result<()> {
    let karras =
        SchedulerConfig { use_karras_sigmas: true, ..sd(SchedulerKind::DpmSolverMultistep) };
    let cases: Vec<(&str, SchedulerConfig, SchedulerKind, usize, PredictionType, f64)> = vec![
        (
            "ddim 50 eps",
            sd(SchedulerKind::Ddim),
            SchedulerKind::Ddim,
            50,
            PredictionType::Epsilon,
            0.1,
        ),
        (
            "ddim 50 v-model",
            sd(SchedulerKind::Ddim),
            SchedulerKind::Ddim,
            50,
            PredictionType::VPrediction,
            0.1,
        ),
        (
            "ddim 50 x0-model",
            sd(SchedulerKind::Ddim),
            SchedulerKind::Ddim,
            50,
            PredictionType::Sample,
            0.1,
        ),
        (
            "euler 50",
            sd(SchedulerKind::Euler),
            SchedulerKind::Euler,
            50,
            PredictionType::Epsilon,
            0.1,
        ),
        (
            "dpm++2m 20",
            sd(SchedulerKind::DpmSolverMultistep),
            SchedulerKind::DpmSolverMultistep,
            20,
            PredictionType::Epsilon,
            0.01,
        ),
        // Karras: the model sees the rounded timestep while the solver uses the exact Karras
        // sigma (as in diffusers), so the model is slightly off the solver's noise level.
        (
            "dpm++2m karras 20 v-model",
            karras.clone(),
            SchedulerKind::DpmSolverMultistep,
            20,
            PredictionType::VPrediction,
            0.05,
        ),
    ];
    for (name, cfg, kind, steps, mk, tol) in cases {
        let e = ode_error(cfg, kind, steps, mk)?;
        println!("{name:28} max |x - x_ode| = {e:.2e}");
        assert!(e < tol, "{name}: {e}");
    }
    // First order: 4x the steps, about 4x less error. Second order beats it by far.
    let ddim20 =
        ode_error(sd(SchedulerKind::Ddim), SchedulerKind::Ddim, 20, PredictionType::Epsilon)?;
    let ddim50 =
        ode_error(sd(SchedulerKind::Ddim), SchedulerKind::Ddim, 50, PredictionType::Epsilon)?;
    let ddim200 =
        ode_error(sd(SchedulerKind::Ddim), SchedulerKind::Ddim, 200, PredictionType::Epsilon)?;
    let dpm20 = ode_error(
        sd(SchedulerKind::DpmSolverMultistep),
        SchedulerKind::DpmSolverMultistep,
        20,
        PredictionType::Epsilon,
    )?;
    println!("ddim 20/50/200: {ddim20:.2e} {ddim50:.2e} {ddim200:.2e}; dpm++2m 20: {dpm20:.2e}");
    assert!(ddim200 < ddim50 / 3.0 && ddim50 < ddim20 / 2.0);
    assert!(dpm20 < ddim20 / 10.0);
    Ok(())
}

#[test]
fn stochastic_samplers_reach_the_data_distribution() -> Result<()> {
    let s = 0.5;
    // Ancestral samplers that use the point estimate E[x0 | x_t] lose a little variance per
    // step (about 7% of the std at 100 steps here); at 500 steps it is below 1%.
    for (kind, steps) in [
        (SchedulerKind::Ddpm, 500),
        (SchedulerKind::EulerAncestral, 500),
        (SchedulerKind::Ddim, 500),
    ] {
        let mut cfg = sd(kind);
        if kind == SchedulerKind::Ddim {
            cfg.eta = 1.0;
        }
        let mut sched = cfg.build_as(kind)?;
        sched.set_timesteps(steps, None)?;
        let den = Gaussian::new(sched.as_ref(), s, PredictionType::Epsilon);
        let mu = mean_tensor((1, 32, 32), 1.0);
        let mut rng = SeededRng::new(21);
        let noise = rng.randn((2, 1, 32, 32), DType::F32, &Device::Cpu)?;
        let x_t = start_from_noise(sched.as_ref(), &noise)?;
        let conds = Conditions { cond: mu.clone(), uncond: None };
        let out = sample(
            &den,
            sched.as_mut(),
            &mut NoGuidance,
            &x_t,
            &conds,
            &mut NoiseSource::Batch(&mut rng),
            &mut |_| {},
        )?;
        let r: Vec<f64> = v(&out)
            .iter()
            .zip(v(&mu.broadcast_as(out.shape())?).iter())
            .map(|(x, m)| x - m)
            .collect();
        let n = r.len() as f64;
        let mean = r.iter().sum::<f64>() / n;
        let std = (r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        println!("{kind:?} {steps}: residual mean {mean:.4}, std {std:.4} (want 0, {s})");
        assert!(mean.abs() < 0.04, "{kind:?} mean {mean}");
        assert!((std - s).abs() < 0.025, "{kind:?} std {std}");
    }
    Ok(())
}

#[test]
fn same_seed_same_sample() -> Result<()> {
    let run = |seed: u64| -> Result<Vec<f64>> {
        let mut sched = sd(SchedulerKind::Ddpm).build()?;
        sched.set_timesteps(10, None)?;
        let den = Gaussian::new(sched.as_ref(), 0.5, PredictionType::Epsilon);
        let mut rng = SeededRng::new(seed);
        let x = rng.randn((1, 1, 4, 4), DType::F32, &Device::Cpu)?;
        let conds = Conditions { cond: mean_tensor((1, 4, 4), 0.0), uncond: None };
        Ok(v(&sample(
            &den,
            sched.as_mut(),
            &mut NoGuidance,
            &x,
            &conds,
            &mut NoiseSource::Batch(&mut rng),
            &mut |_| {},
        )?))
    };
    assert_eq!(run(5)?, run(5)?);
    assert_ne!(run(5)?, run(6)?);
    Ok(())
}

/// Point masses: x0 predictions are exact, so the final DDIM sample (set_alpha_to_one) is
/// the guided x0 of the last step.
fn point_mass_run(
    guidance: &mut dyn gen_diffusion::Guidance,
    steps: usize,
    model_kind: PredictionType,
    kind: SchedulerKind,
) -> Result<(Tensor, Tensor, Tensor, Vec<Vec<f64>>)> {
    let mut sched =
        SchedulerConfig { clip_sample: Some(false), ..Default::default() }.build_as(kind)?;
    sched.set_timesteps(steps, None)?;
    let den = Gaussian::new(sched.as_ref(), 0.0, model_kind);
    let mu_c = mean_tensor((2, 3, 3), 0.0);
    let mu_u = (mean_tensor((2, 3, 3), 2.0) * 0.5)?;
    let noise = SeededRng::new(4).randn((1, 2, 3, 3), DType::F32, &Device::Cpu)?;
    let x = start_from_noise(sched.as_ref(), &noise)?;
    let conds = Conditions { cond: mu_c.clone(), uncond: Some(mu_u.clone()) };
    let mut x0s = vec![];
    let out = sample(
        &den,
        sched.as_mut(),
        guidance,
        &x,
        &conds,
        &mut NoiseSource::Batch(&mut SeededRng::new(0)),
        &mut |e| x0s.push(v(e.pred_x0)),
    )?;
    Ok((out, mu_c, mu_u, x0s))
}

#[test]
fn cfg_end_to_end_lands_on_the_guided_point() -> Result<()> {
    for mk in [PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample] {
        let (out, c, u, _) = point_mass_run(&mut Cfg::new(3.0)?, 20, mk, SchedulerKind::Ddim)?;
        let want = (&u + ((&c - &u)? * 3.0)?)?;
        let e = max_abs_diff(&v(&out), &v(&want));
        assert!(e < 1e-4, "{mk:?}: {e}");
    }
    // Euler ends at sigma 0, i.e. at x0 as well.
    let (out, c, u, _) =
        point_mass_run(&mut Cfg::new(2.0)?, 15, PredictionType::Epsilon, SchedulerKind::Euler)?;
    let want = (&u + ((&c - &u)? * 2.0)?)?;
    assert!(max_abs_diff(&v(&out), &v(&want)) < 1e-4);
    Ok(())
}

#[test]
fn apg_end_to_end_momentum_over_the_trajectory() -> Result<()> {
    // Constant c, u in x0 space: delta d each step, m_K = d (1 - beta^K) / (1 - beta) after K steps,
    // then rescale to norm <= r, then project onto c (per sample).
    let (w, eta, r, beta, k) = (4.0, 0.3, 2.0, -0.5, 12usize);
    let mut g = Apg::new(ApgConfig {
        scale: w,
        eta,
        norm_threshold: r,
        momentum: beta,
        formulation: ApgFormulation::Paper,
        space: Space::X0,
    })?;
    let (out, c, u, x0s) = point_mass_run(&mut g, k, PredictionType::Epsilon, SchedulerKind::Ddim)?;
    let (c, u) = (v(&c), v(&u));
    let expect = |steps: usize| -> Vec<f64> {
        let f = (1.0 - beta.powi(steps as i32)) / (1.0 - beta);
        let mut m: Vec<f64> = c.iter().zip(&u).map(|(c, u)| (c - u) * f).collect();
        let norm = m.iter().map(|x| x * x).sum::<f64>().sqrt();
        let sc = (r / norm).min(1.0);
        m.iter_mut().for_each(|x| *x *= sc);
        let cn = c.iter().map(|x| x * x).sum::<f64>().sqrt();
        let dot: f64 = m.iter().zip(&c).map(|(m, c)| m * c / cn).sum();
        c.iter()
            .zip(&m)
            .map(|(ci, mi)| {
                let par = dot * ci / cn;
                ci + (w - 1.0) * ((mi - par) + eta * par)
            })
            .collect()
    };
    for (i, x0) in x0s.iter().enumerate() {
        let e = max_abs_diff(x0, &expect(i + 1));
        assert!(e < 1e-3, "step {i}: {e}");
    }
    assert!(max_abs_diff(&v(&out), &expect(k)) < 1e-3);
    // without momentum the result differs (so the check above can fail)
    assert!(max_abs_diff(&expect(1), &expect(k)) > 0.05);
    // the state is reset per trajectory: a second run gives the same result
    let (out2, ..) = point_mass_run(&mut g, k, PredictionType::Epsilon, SchedulerKind::Ddim)?;
    assert_eq!(v(&out), v(&out2));
    Ok(())
}

#[test]
fn guidance_interval_by_sigma_ends_unguided() -> Result<()> {
    // Guidance only while sigma > 1: early steps guided, the end is the conditional point.
    let mut g = Interval::new(Cfg::new(3.0)?, IntervalRange::Sigma { lo: 1.0, hi: f64::INFINITY })?;
    let (out, c, u, x0s) =
        point_mass_run(&mut g, 20, PredictionType::Epsilon, SchedulerKind::Ddim)?;
    assert!(max_abs_diff(&v(&out), &v(&c)) < 1e-4);
    let guided = v(&(&u + ((&c - &u)? * 3.0)?)?);
    assert!(max_abs_diff(&x0s[0], &guided) < 1e-3, "first step should be guided");
    Ok(())
}

#[test]
fn img2img_strength_runs_the_tail_and_errors_are_clear() -> Result<()> {
    let mut sched = sd(SchedulerKind::Ddim).build()?;
    sched.set_timesteps(20, Some(0.5))?;
    assert_eq!(sched.timesteps().len(), 10);
    assert_eq!(sched.timesteps()[0], 451.0); // leading, offset 1: 951, 901, ..., the 11th is 451
    let den = Gaussian::new(sched.as_ref(), 0.0, PredictionType::Epsilon);
    let mu = mean_tensor((1, 4, 4), 0.0);
    let x0 = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu)?;
    let noise = SeededRng::new(1).randn((1, 1, 4, 4), DType::F32, &Device::Cpu)?;
    let x = sched.add_noise(&x0, &noise, &[sched.timesteps()[0]])?;
    let mut n = 0;
    let conds = Conditions { cond: mu.clone(), uncond: None };
    let out = sample(
        &den,
        sched.as_mut(),
        &mut NoGuidance,
        &x,
        &conds,
        &mut NoiseSource::Batch(&mut SeededRng::new(0)),
        &mut |_| n += 1,
    )?;
    assert_eq!(n, 10);
    // Point mass: eps_hat = (x - sqrt(a) mu) / sqrt(1 - a) stays constant along DDIM, and the
    // end is at a_0 (set_alpha_to_one = false): x = sqrt(a_0) mu + sqrt(1 - a_0) eps_hat.
    let (a_s, a_0) = (sched.alphas_cumprod()[451], sched.alphas_cumprod()[0]);
    let eps = ((&x - (&mu * a_s.sqrt())?)? * (1.0 / (1.0 - a_s).sqrt()))?;
    let want = ((&mu * a_0.sqrt())? + (eps * (1.0 - a_0).sqrt())?)?;
    assert!(max_abs_diff(&v(&out), &v(&want)) < 1e-4);
    // CFG without an unconditional condition: a clear error
    sched.set_timesteps(5, None)?;
    let err = sample(
        &den,
        sched.as_mut(),
        &mut Cfg::new(5.0)?,
        &x,
        &conds,
        &mut NoiseSource::Batch(&mut SeededRng::new(0)),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("unconditional"), "{err}");
    assert!(sched.set_timesteps(5, Some(1.5)).is_err());
    assert!(sched.set_timesteps(0, None).is_err());
    Ok(())
}
