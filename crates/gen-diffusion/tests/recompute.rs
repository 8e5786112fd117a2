//! Recomputable steps: every step of [`sample`] can be recomputed from its [`StepInputs`]
//! (step index, sample, scheduler and guidance state) on a freshly built scheduler and
//! guidance, in any order, giving the original bytes — for every scheduler and for CFG, APG
//! (with momentum), CFG-rescale and guidance intervals. Also: the loop stops with an error
//! naming the step when the latents turn non-finite.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use gen_core::SeededRng;
use gen_diffusion::{
    sample, sample_step, start_from_noise, ApgConfig, Conditions, Denoiser, GuidanceConfig,
    GuidanceMethod, IntervalRange, NoiseSource, PredictionType, SchedulerConfig, SchedulerKind,
    StepInputs,
};

/// A nonlinear, timestep-dependent toy model: `tanh(x / 2) + cond * (0.3 + t / 1000)`.
/// `nan_below`: the prediction turns NaN once the timestep drops below it.
struct Toy {
    kind: PredictionType,
    nan_below: Option<f64>,
}

impl Denoiser for Toy {
    /// Same shape as the sample.
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
        let t = timesteps[0];
        conds
            .iter()
            .map(|c| {
                let out = ((x * 0.5)?.tanh()? + (*c * (0.3 + t / 1000.0))?)?;
                Ok(match self.nan_below {
                    Some(lim) if t < lim => (out * f64::NAN)?,
                    _ => out,
                })
            })
            .collect()
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn patterned(shape: (usize, usize, usize, usize), phase: f64, amp: f64) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n).map(|i| (amp * (0.37 * i as f64 + phase).sin()) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The scheduler setups checked: every kind, plus Karras sigmas and stochastic DDIM.
fn schedulers() -> Vec<(String, SchedulerKind, SchedulerConfig)> {
    let mut out = Vec::new();
    for kind in [
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverMultistep,
    ] {
        out.push((format!("{kind:?}"), kind, SchedulerConfig::stable_diffusion(kind)));
    }
    let mut ddim_eta = SchedulerConfig::stable_diffusion(SchedulerKind::Ddim);
    ddim_eta.eta = 0.6;
    out.push(("Ddim eta 0.6".into(), SchedulerKind::Ddim, ddim_eta));
    for kind in [SchedulerKind::Euler, SchedulerKind::DpmSolverMultistep] {
        let mut c = SchedulerConfig::stable_diffusion(kind);
        c.use_karras_sigmas = true;
        out.push((format!("{kind:?} karras"), kind, c));
    }
    out
}

/// The guidance setups checked.
fn guidances() -> Vec<(&'static str, GuidanceConfig)> {
    // A small norm threshold so the APG rescale acts on the toy model's values.
    let apg = ApgConfig { norm_threshold: 0.8, ..ApgConfig::paper(4.0) };
    vec![
        ("cfg", GuidanceConfig::cfg(4.0)),
        (
            "apg",
            GuidanceConfig { method: GuidanceMethod::Apg(apg.clone()), ..GuidanceConfig::cfg(1.0) },
        ),
        (
            "apg diffusers",
            GuidanceConfig {
                method: GuidanceMethod::Apg(ApgConfig {
                    momentum: 0.4,
                    ..ApgConfig::diffusers(3.0)
                }),
                ..GuidanceConfig::cfg(1.0)
            },
        ),
        ("cfg rescale", GuidanceConfig { rescale_phi: 0.7, ..GuidanceConfig::cfg(5.0) }),
        (
            "apg interval rescale",
            GuidanceConfig {
                method: GuidanceMethod::Apg(apg),
                rescale_phi: 0.5,
                interval: Some(IntervalRange::parse("0.2,0.8").unwrap()),
            },
        ),
    ]
}

struct Run {
    inputs: Vec<StepInputs>,
    outputs: Vec<Vec<u32>>,
}

/// One trajectory of 7 steps (image-to-image with `strength`), recording every step.
fn run(
    kind: SchedulerKind,
    sc: &SchedulerConfig,
    g: &GuidanceConfig,
    strength: Option<f64>,
    conds: &Conditions<Tensor>,
) -> Result<Run> {
    let den = Toy { kind: sc.prediction_type, nan_below: None };
    let mut sched = sc.build_as(kind)?;
    sched.set_timesteps(7, strength)?;
    let mut rng = SeededRng::new(5);
    let noise = rng.randn((2, 2, 3, 3), DType::F32, &Device::Cpu)?;
    let x = match strength {
        None => start_from_noise(sched.as_ref(), &noise)?,
        Some(_) => {
            let t0 = sched.timesteps()[0];
            sched.add_noise(&patterned((2, 2, 3, 3), 0.3, 0.8), &noise, &[t0, t0])?
        }
    };
    let mut guidance = g.build()?;
    let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
    sample(
        &den,
        sched.as_mut(),
        &mut guidance,
        &x,
        conds,
        &mut NoiseSource::Batch(&mut rng),
        &mut |e| {
            inputs.push(e.inputs.clone());
            outputs.push(bits(e.sample));
        },
    )?;
    Ok(Run { inputs, outputs })
}

fn conditions() -> Conditions<Tensor> {
    Conditions {
        cond: patterned((2, 2, 3, 3), 0.0, 1.0),
        uncond: Some(patterned((2, 2, 3, 3), 1.1, 0.4)),
    }
}

#[test]
fn every_step_recomputes_bit_for_bit_from_its_inputs() -> Result<()> {
    let conds = conditions();
    let mut checked = 0;
    for (sname, kind, sc) in schedulers() {
        for (gname, g) in guidances() {
            for strength in [None, Some(0.6)] {
                let what = format!("{sname} / {gname} / strength {strength:?}");
                let r = run(kind, &sc, &g, strength, &conds)?;
                assert!(r.inputs.len() >= 4, "{what}: {} steps", r.inputs.len());
                let den = Toy { kind: sc.prediction_type, nan_below: None };
                // Backwards, each on a fresh scheduler and guidance: nothing carries over.
                for (inp, want) in r.inputs.iter().zip(&r.outputs).rev() {
                    let mut sched = sc.build_as(kind)?;
                    sched.set_timesteps(7, strength)?;
                    let mut guidance = g.build()?;
                    let got = sample_step(&den, sched.as_mut(), &mut guidance, &conds, inp)?;
                    assert_eq!(&bits(&got.sample), want, "{what}: step {}", inp.index);
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 300, "{checked} steps checked");
    Ok(())
}

/// The state is what makes the recomputation exact: without it, a step of the multistep
/// solver (history) or of APG with momentum computes something else.
#[test]
fn the_state_is_needed() -> Result<()> {
    let conds = conditions();
    let cases = [
        (SchedulerKind::DpmSolverMultistep, GuidanceConfig::cfg(4.0)),
        (
            SchedulerKind::Ddim,
            GuidanceConfig {
                method: GuidanceMethod::Apg(ApgConfig {
                    norm_threshold: 0.0,
                    ..ApgConfig::paper(4.0)
                }),
                ..GuidanceConfig::cfg(1.0)
            },
        ),
    ];
    for (kind, g) in cases {
        let sc = SchedulerConfig::stable_diffusion(kind);
        let r = run(kind, &sc, &g, None, &conds)?;
        let den = Toy { kind: sc.prediction_type, nan_below: None };
        let inp = &r.inputs[3];
        let mut sched = sc.build_as(kind)?;
        sched.set_timesteps(7, None)?;
        let mut guidance = g.build()?;
        let stateless = StepInputs {
            scheduler: Default::default(),
            guidance: Default::default(),
            ..inp.clone()
        };
        let got = sample_step(&den, sched.as_mut(), &mut guidance, &conds, &stateless)?;
        assert_ne!(bits(&got.sample), r.outputs[3], "{kind:?} {g:?}: the state made no difference");
    }
    Ok(())
}

#[test]
fn non_finite_latents_stop_with_the_step() -> Result<()> {
    let sc = SchedulerConfig::stable_diffusion(SchedulerKind::Ddim);
    let mut sched = sc.build_as(SchedulerKind::Ddim)?;
    sched.set_timesteps(10, None)?;
    // Timesteps 901, 801, …: NaN from the 4th step (t = 601) on.
    let den = Toy { kind: sc.prediction_type, nan_below: Some(650.0) };
    let mut rng = SeededRng::new(1);
    let x = rng.randn((1, 2, 3, 3), DType::F32, &Device::Cpu)?;
    let conds = Conditions { cond: patterned((1, 2, 3, 3), 0.0, 1.0), uncond: None };
    let mut steps = 0;
    let err = sample(
        &den,
        sched.as_mut(),
        &mut gen_diffusion::NoGuidance,
        &x,
        &conds,
        &mut NoiseSource::Batch(&mut rng),
        &mut |_| steps += 1,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(steps, 3, "{err}");
    assert!(err.contains("non-finite") && err.contains("step 4 of 10"), "{err}");
    Ok(())
}

#[test]
fn per_sample_noise_does_not_depend_on_the_batch() -> Result<()> {
    let dev = Device::Cpu;
    let mut both = [SeededRng::fork(3, 0), SeededRng::fork(3, 1)];
    let pair = NoiseSource::PerSample(&mut both).randn(&[2, 2, 3, 3], DType::F32, &dev)?;
    let mut second = [SeededRng::fork(3, 1)];
    let alone = NoiseSource::PerSample(&mut second).randn(&[1, 2, 3, 3], DType::F32, &dev)?;
    assert_eq!(bits(&pair.narrow(0, 1, 1)?), bits(&alone));
    assert_ne!(bits(&pair.narrow(0, 0, 1)?), bits(&alone));
    let err = NoiseSource::PerSample(&mut second).randn(&[2, 2, 3, 3], DType::F32, &dev);
    assert!(err.unwrap_err().to_string().contains("1 generators for a batch"));
    Ok(())
}
