//! Schedulers, prediction-type conversions and the one guidance implementation (CFG, APG,
//! CFG-rescale, guidance intervals) of the `gen` toolkit, model-agnostic: models plug in
//! through the [`Denoiser`] trait, and [`sample`] runs a guided trajectory.
//!
//! Guidance convention: `D = u + w (c - u)`, `w = 1` is no guidance (threestudio's
//! `s = w - 1`). Schedulers follow diffusers 0.42.1 and are checked against it by fixtures
//! from `scripts/fixtures_schedulers.py`.

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
    Apg, ApgConfig, ApgFormulation, Branch, Cfg, Guidance, Guided, Interval, IntervalRange, NoGuidance, Predictions, Rescale, Space, StepInfo,
};
pub use prediction::{convert, to_eps, to_v, to_x0, PredictionType};
pub use sampling::{sample, start_from_noise, SampleEvent};
pub use schedule::{BetaSchedule, TimestepSpacing};
pub use scheduler::{Scheduler, StepOutput};
pub use schedulers::{DdimScheduler, DdpmScheduler, DpmSolverMultistepScheduler, EulerAncestralScheduler, EulerScheduler};
