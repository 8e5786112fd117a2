//! The sampling loop shared by text-to-image, image-to-image and the tests.

use candle_core::Tensor;
use gen_core::{Error, Result, SeededRng};

use crate::denoiser::{guided_prediction, Conditions, Denoiser};
use crate::guidance::{Guidance, StepInfo};
use crate::prediction::convert;
use crate::scheduler::Scheduler;

/// Progress of [`sample`], sent after each step.
#[derive(Debug)]
pub struct SampleEvent<'a> {
    pub step: usize,
    pub num_steps: usize,
    pub timestep: f64,
    /// The sample after this step.
    pub sample: &'a Tensor,
    /// The guided clean-sample estimate of this step (x0 space).
    pub pred_x0: &'a Tensor,
}

/// The starting sample for text-to-image: standard normal `noise` times the scheduler's
/// initial sigma.
pub fn start_from_noise(scheduler: &dyn Scheduler, noise: &Tensor) -> Result<Tensor> {
    Ok((noise * scheduler.init_noise_sigma())?)
}

/// Runs the scheduler's remaining timesteps from `x_start` (B, C, H, W), in the scheduler's
/// sample space (see [`start_from_noise`] and [`Scheduler::add_noise`]); call
/// `set_timesteps` first. At each step: scale the input, evaluate the branches the guidance
/// asks for, combine (converting to x0 space where the guidance works there), convert the
/// guided prediction to the scheduler's prediction type, step. The guidance state is reset
/// at the start. Stochastic schedulers draw their noise from `rng`. Returns the final sample.
pub fn sample<D, G>(
    denoiser: &D,
    scheduler: &mut dyn Scheduler,
    guidance: &mut G,
    x_start: &Tensor,
    conds: &Conditions<D::Cond>,
    rng: &mut SeededRng,
    progress: &mut dyn FnMut(&SampleEvent),
) -> Result<Tensor>
where
    D: Denoiser + ?Sized,
    G: Guidance + ?Sized,
{
    let timesteps = scheduler.timesteps().to_vec();
    if timesteps.is_empty() {
        return Err(Error::msg("sample: the scheduler has no timesteps; call set_timesteps first"));
    }
    guidance.reset();
    let b = x_start.dim(0)?;
    let n = timesteps.len();
    let mut x = x_start.clone();
    for (i, &t) in timesteps.iter().enumerate() {
        let x_in = scheduler.scale_model_input(&x, t)?;
        let a = scheduler.model_alpha_cumprod(t)?;
        let step = StepInfo { step: Some((i, n)), timestep: t, sigma: ((1.0 - a) / a).sqrt() };
        let (ts, alphas) = (vec![t; b], vec![a; b]);
        let g = guided_prediction(denoiser, guidance, &x_in, &ts, &alphas, conds, &step)?;
        let out = convert(
            &g.model_output,
            &x_in,
            &alphas,
            denoiser.prediction_type(),
            scheduler.prediction_type(),
        )?;
        let s = scheduler.step(&out, t, &x, rng)?;
        x = s.prev_sample;
        progress(&SampleEvent { step: i, num_steps: n, timestep: t, sample: &x, pred_x0: &g.x0 });
    }
    Ok(x)
}
