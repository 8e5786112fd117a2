//! The scheduler trait shared by every sampler, and what the schedulers have in common.

use candle_core::Tensor;
use gen_core::{Error, Result, SeededRng};

use crate::config::{SchedulerConfig, SchedulerKind};
use crate::prediction::PredictionType;
use crate::schedule;

/// Result of one denoising step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The sample at the next (less noisy) timestep, same shape as the input sample.
    pub prev_sample: Tensor,
    /// The scheduler's clean-sample estimate x0 at this step (after clipping, where configured).
    pub pred_original_sample: Tensor,
}

/// What a scheduler carries from one step of a trajectory to the next: its position and,
/// for multistep solvers, the history of data predictions. [`Scheduler::state`] reads it and
/// [`Scheduler::set_state`] restores it, so a step can be recomputed from (step index, sample,
/// state) alone — what gradient checkpointing through a sampling chain needs. Everything
/// else in a scheduler is fixed by its config and [`Scheduler::set_timesteps`].
#[derive(Debug, Clone, Default)]
pub struct SchedulerState {
    /// Index into the full (untruncated) schedule of the next step; `None` before the first
    /// step (the sigma-based schedulers keep it; the others find the step from `t`).
    pub step_index: Option<usize>,
    /// Data predictions x0 of the previous steps, oldest first (`solver_order` slots, DPM-Solver
    /// only; empty for the one-step schedulers).
    pub history: Vec<Option<Tensor>>,
    /// How many lower-order warm-up steps a multistep solver has taken (DPM-Solver only).
    pub lower_order_nums: usize,
}

/// A diffusion sampler. Usage per trajectory: [`Scheduler::set_timesteps`], then for each `t`
/// in [`Scheduler::timesteps`]: `x_in = scale_model_input(x, t)`, run the model on `x_in`,
/// `x = step(model_output, t, x, rng).prev_sample`. Samples start as standard normal noise
/// times [`Scheduler::init_noise_sigma`] (text-to-image) or from [`Scheduler::add_noise`]
/// (image-to-image, with `strength`).
///
/// Tensors are (B, C, H, W) (any rank with the batch first works); timesteps are training-time
/// indices in [0, num_train_timesteps) given as f64 (the sigma-based schedulers use
/// fractional ones).
pub trait Scheduler: Send {
    /// Which scheduler this is.
    fn kind(&self) -> SchedulerKind;
    /// The configuration it was built from.
    fn config(&self) -> &SchedulerConfig;
    /// Prepares `num_inference_steps` steps. `strength` in (0, 1] (image-to-image) keeps only
    /// the last `floor(n * strength)` of them, as diffusers' img2img pipelines do.
    fn set_timesteps(&mut self, num_inference_steps: usize, strength: Option<f64>) -> Result<()>;
    /// The timesteps still to run, descending (after `strength` truncation).
    fn timesteps(&self) -> &[f64];
    /// Cumulative alpha products of the training schedule, one per training timestep.
    fn alphas_cumprod(&self) -> &[f64];
    /// Noise levels `sigma = sqrt((1-a)/a)` of the inference schedule: one per entry of
    /// [`Scheduler::timesteps`] plus the final one after the last step.
    fn sigmas(&self) -> Vec<f64>;
    /// Standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f64;
    /// The model input for sample `x` at timestep `t` (identity except for Euler-type schedulers).
    fn scale_model_input(&self, x: &Tensor, t: f64) -> Result<Tensor>;
    /// The cumulative alpha `a` that relates the *model input* at `t` to x0 and eps:
    /// `model_input = sqrt(a) x0 + sqrt(1-a) eps`. Used to convert between prediction types.
    fn model_alpha_cumprod(&self, t: f64) -> Result<f64>;
    /// Whether the step at `t` draws fresh noise.
    fn needs_noise(&self, t: f64) -> bool;
    /// The step state after the steps taken so far (see [`SchedulerState`]).
    fn state(&self) -> SchedulerState {
        SchedulerState::default()
    }
    /// Restores a state read by [`Scheduler::state`] (on a scheduler with the same config and
    /// `set_timesteps`); the next step then computes exactly what it computed from there.
    fn set_state(&mut self, state: SchedulerState) -> Result<()> {
        let _ = state;
        Ok(())
    }
    /// One step with explicitly given noise (`None` only when `needs_noise(t)` is false).
    /// `model_output` is of the configured prediction type, computed at `scale_model_input(sample, t)`.
    fn step_with_noise(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput>;
    /// One step, drawing noise (when needed) from `rng` in the sample's shape.
    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        rng: &mut SeededRng,
    ) -> Result<StepOutput> {
        if self.needs_noise(t) {
            let noise = rng.randn(sample.shape(), sample.dtype(), sample.device())?;
            self.step_with_noise(model_output, t, sample, Some(&noise))
        } else {
            self.step_with_noise(model_output, t, sample, None)
        }
    }
    /// Noises clean samples `x0` to per-sample timesteps `timesteps` (B values) with `noise`,
    /// giving a sample in this scheduler's sample space (VP for DDIM/DDPM/DPM-Solver,
    /// `x0 + sigma * noise` for Euler-type schedulers).
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor>;
    /// A copy with the same state (timesteps, step position, multistep history).
    fn boxed_clone(&self) -> Box<dyn Scheduler>;
    /// The prediction type the scheduler expects from the model.
    fn prediction_type(&self) -> PredictionType {
        self.config().prediction_type
    }
}

/// Training schedule shared by all schedulers.
#[derive(Debug, Clone)]
pub(crate) struct TrainSchedule {
    pub alphas_cumprod: Vec<f64>,
}

impl TrainSchedule {
    /// `sigma_based`: the sigma-parameterised schedulers replace a zero terminal alpha by
    /// 2^-24 (as diffusers does) so the largest sigma stays finite.
    pub fn new(cfg: &SchedulerConfig, sigma_based: bool) -> Result<Self> {
        cfg.validate()?;
        let mut betas = match &cfg.trained_betas {
            Some(b) => b.iter().map(|&x| x as f32).collect(),
            None => schedule::betas(
                cfg.beta_schedule,
                cfg.beta_start,
                cfg.beta_end,
                cfg.num_train_timesteps,
            ),
        };
        if cfg.rescale_betas_zero_snr {
            betas = schedule::rescale_zero_terminal_snr(&betas);
        }
        let mut alphas_cumprod = schedule::alphas_cumprod(&betas);
        if cfg.rescale_betas_zero_snr && sigma_based {
            // diffusers' sigma-based schedulers avoid an infinite sigma this way.
            let n = alphas_cumprod.len();
            alphas_cumprod[n - 1] = 2f64.powi(-24);
        }
        Ok(Self { alphas_cumprod })
    }

    /// `alphas_cumprod[t]` for an integer timestep, with a clear error otherwise.
    pub fn at(&self, t: f64) -> Result<f64> {
        let i = int_timestep(t, self.alphas_cumprod.len())?;
        Ok(self.alphas_cumprod[i])
    }
}

/// Checks that `t` is an integer timestep in range.
pub(crate) fn int_timestep(t: f64, num_train: usize) -> Result<usize> {
    if t.fract() != 0.0 || t < 0.0 || t >= num_train as f64 {
        return Err(Error::invalid(
            "timestep",
            format!("{t} is not an integer in [0, {num_train})"),
        ));
    }
    Ok(t as usize)
}

/// First index kept for image-to-image `strength` (diffusers' `get_timesteps`).
pub(crate) fn strength_start(n: usize, strength: Option<f64>) -> Result<usize> {
    match strength {
        None => Ok(0),
        Some(s) if s > 0.0 && s <= 1.0 => {
            let init = ((n as f64 * s) as usize).min(n);
            if init == 0 {
                return Err(Error::invalid(
                    "strength",
                    format!("{s} with {n} steps leaves no step to run"),
                ));
            }
            Ok(n - init)
        }
        Some(s) => Err(Error::invalid("strength", format!("{s} is outside (0, 1]"))),
    }
}

pub(crate) fn check_steps(n: usize, num_train: usize) -> Result<()> {
    if n == 0 || n > num_train {
        return Err(Error::invalid(
            "num_inference_steps",
            format!("{n} (must be in 1..={num_train})"),
        ));
    }
    Ok(())
}

pub(crate) fn not_set() -> Error {
    Error::msg("scheduler: call set_timesteps before stepping")
}

pub(crate) fn check_same_shape(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::invalid(
            what,
            format!("shape {:?} differs from the sample's {:?}", a.dims(), b.dims()),
        ));
    }
    Ok(())
}

pub(crate) fn need_noise<'a>(
    noise: Option<&'a Tensor>,
    sample: &Tensor,
    who: &str,
) -> Result<&'a Tensor> {
    let n = noise.ok_or_else(|| Error::invalid(who, "this step needs noise but none was given"))?;
    check_same_shape(n, sample, "noise")?;
    Ok(n)
}

/// `p * x + q * y` with scalar coefficients, in the tensors' dtype.
pub(crate) fn axpby(p: f64, x: &Tensor, q: f64, y: &Tensor) -> Result<Tensor> {
    Ok(((x * p)? + (y * q)?)?)
}

/// diffusers' `index_for_timestep`: position of `t` in `schedule`; the second match when it
/// occurs twice (so image-to-image does not skip a sigma).
pub(crate) fn index_for_timestep(t: f64, schedule: &[f64]) -> Result<usize> {
    let idx: Vec<usize> =
        schedule.iter().enumerate().filter(|(_, &s)| s == t).map(|(i, _)| i).collect();
    match idx.len() {
        0 => Err(Error::invalid("timestep", format!("{t} is not in the scheduler's timesteps"))),
        1 => Ok(idx[0]),
        _ => Ok(idx[1]),
    }
}
