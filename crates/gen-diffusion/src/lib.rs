//! Schedulers, prediction-type conversions and the one guidance implementation (CFG, APG,
//! CFG-rescale, guidance intervals) of the `gen` toolkit, model-agnostic: models plug in
//! through the [`Denoiser`] trait, and [`sample`] runs a guided trajectory (the one loop;
//! its per-step state is explicit, so [`sample_step`] recomputes any step). Score
//! distillation and reward fine-tuning reuse [`guided_prediction`] (one guided model call at
//! per-sample timesteps) and the differentiable guidance components.
//!
//! Guidance convention: `D = u + w (c - u)`, `w = 1` is no guidance. threestudio writes
//! `c + s (c - u)`, i.e. `s = w - 1`.
//!
//! Schedulers follow diffusers 0.42.1 (`DDIMScheduler`, `DDPMScheduler`,
//! `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `DPMSolverMultistepScheduler`)
//! and are checked against it by fixtures from `scripts/fixtures_schedulers.py`; the diffusers
//! APG / CFG-rescale guiders by `scripts/fixtures_guidance.py`.
//!
//! Typical use (text-to-image):
//! ```text
//! let cfg = SchedulerConfig::from_file("model/scheduler/scheduler_config.json")?;
//! let mut scheduler = cfg.build_as(SchedulerKind::DpmSolverMultistep)?;
//! scheduler.set_timesteps(30, None)?;
//! let mut guidance = GuidanceConfig::cfg(7.5).build()?;          // or Apg::new(ApgConfig::paper(w))
//! let x = start_from_noise(scheduler.as_ref(), &rng.randn((1, 4, 64, 64), DType::F32, &dev)?)?;
//! let conds = Conditions { cond: text_emb, uncond: Some(empty_emb) };
//! let latents = sample(&unet_denoiser, scheduler.as_mut(), &mut guidance, &x, &conds,
//!                      &mut NoiseSource::Batch(&mut rng), &mut |ev| {})?;
//! ```

pub mod config;
pub mod denoiser;
pub mod guidance;
pub mod prediction;
pub mod sampling;
pub mod schedule;
pub mod scheduler;
pub mod schedulers;

pub use config::{FinalSigmas, SchedulerConfig, SchedulerKind, VarianceType};
pub use denoiser::{guided_prediction, Conditions, Denoiser, GuidedPrediction};
pub use guidance::{
    Apg, ApgConfig, ApgFormulation, Branch, Cfg, Guidance, GuidanceConfig, GuidanceMethod,
    GuidanceState, Guided, Interval, IntervalRange, NoGuidance, Predictions, Rescale, Space,
    StepInfo, SDXL_LATENT_DIM,
};
pub use prediction::{convert, to_eps, to_v, to_x0, PredictionType};
pub use sampling::{
    sample, sample_step, start_from_noise, NoiseSource, SampleEvent, StepInputs, StepResult,
};
pub use schedule::{BetaSchedule, TimestepSpacing};
pub use scheduler::{Scheduler, SchedulerState, StepOutput};
pub use schedulers::{
    DdimScheduler, DdpmScheduler, DpmSolverMultistepScheduler, EulerAncestralScheduler,
    EulerScheduler,
};
