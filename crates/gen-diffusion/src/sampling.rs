//! The one sampling loop, shared by text-to-image, image-to-image, the metrics and the tests.

use std::collections::VecDeque;

use candle_core::{DType, Device, Tensor};
use gen_core::{Error, Result, SeededRng};

use crate::denoiser::{guided_prediction, Conditions, Denoiser};
use crate::guidance::{Guidance, GuidanceState, StepInfo};
use crate::prediction::convert;
use crate::scheduler::{Scheduler, SchedulerState};

/// Where the sampling loop draws its random numbers (the initial noise, drawn by the caller
/// with [`NoiseSource::randn`], and the step noise of stochastic schedulers).
#[derive(Debug)]
pub enum NoiseSource<'a> {
    /// One generator for the whole batch: each draw has the batch's shape.
    Batch(&'a mut SeededRng),
    /// One generator per sample: sample `j` draws its `(1, ...)` part from generator `j`, so
    /// its noise does not depend on the batch it is in (`gen image`'s batch invariance).
    PerSample(&'a mut [SeededRng]),
    /// Recorded noise (e.g. what a reference implementation drew), one tensor per draw in
    /// order; each draw must have the requested shape and is converted to the requested dtype
    /// and device. Running out is an error naming the draw.
    Given(VecDeque<Tensor>),
}

impl NoiseSource<'_> {
    /// Standard normal noise of `shape` (batch first).
    pub fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        match self {
            Self::Batch(rng) => rng.randn(shape, dtype, device),
            Self::PerSample(rngs) => {
                if shape.first() != Some(&rngs.len()) {
                    return Err(Error::invalid(
                        "per-sample noise",
                        format!("{} generators for a batch of shape {shape:?}", rngs.len()),
                    ));
                }
                let mut one = shape.to_vec();
                one[0] = 1;
                let parts = rngs
                    .iter_mut()
                    .map(|r| r.randn(one.as_slice(), dtype, device))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, 0)?)
            }
            Self::Given(queue) => {
                let t = queue.pop_front().ok_or_else(|| {
                    Error::invalid(
                        "given noise",
                        format!("no recorded noise left for a draw of shape {shape:?}"),
                    )
                })?;
                if t.dims() != shape {
                    return Err(Error::invalid(
                        "given noise",
                        format!(
                            "a recorded tensor of shape {:?} for a draw of shape {shape:?}",
                            t.dims()
                        ),
                    ));
                }
                Ok(t.to_dtype(dtype)?.to_device(device)?)
            }
        }
    }
}

/// Everything one step of [`sample`] starts from. With the same denoiser, conditions and
/// scheduler schedule (config and `set_timesteps`), [`sample_step`] recomputes the step from
/// it bit for bit, in any order.
#[derive(Debug, Clone)]
pub struct StepInputs {
    /// Position in the scheduler's [`Scheduler::timesteps`].
    pub index: usize,
    /// The sample before the step, (B, C, H, W).
    pub sample: Tensor,
    /// The scheduler's state before the step.
    pub scheduler: SchedulerState,
    /// The guidance's state before the step.
    pub guidance: GuidanceState,
    /// The step noise, when the scheduler draws one at this step.
    pub noise: Option<Tensor>,
}

/// What one step gives.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// The sample after the step.
    pub sample: Tensor,
    /// The guided clean-sample estimate of the step (x0 space).
    pub pred_x0: Tensor,
}

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
    /// What this step started from (to recompute it with [`sample_step`]).
    pub inputs: &'a StepInputs,
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
/// at the start. Stochastic schedulers draw their step noise from `noise`. Returns the final
/// sample; stops with an error naming the step when the sample turns non-finite.
pub fn sample<D, G>(
    denoiser: &D,
    scheduler: &mut dyn Scheduler,
    guidance: &mut G,
    x_start: &Tensor,
    conds: &Conditions<D::Cond>,
    noise: &mut NoiseSource,
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
    let n = timesteps.len();
    let mut x = x_start.clone();
    for (i, &t) in timesteps.iter().enumerate() {
        let step_noise = if scheduler.needs_noise(t) {
            Some(noise.randn(x.dims(), x.dtype(), x.device())?)
        } else {
            None
        };
        let inputs = StepInputs {
            index: i,
            sample: x,
            scheduler: scheduler.state(),
            guidance: guidance.state(),
            noise: step_noise,
        };
        let r = run_step(denoiser, scheduler, guidance, conds, &inputs)?;
        progress(&SampleEvent {
            step: i,
            num_steps: n,
            timestep: t,
            sample: &r.sample,
            pred_x0: &r.pred_x0,
            inputs: &inputs,
        });
        x = r.sample;
    }
    Ok(x)
}

/// Recomputes one step of [`sample`] from its [`StepInputs`]: restores the scheduler and
/// guidance states, then steps. `scheduler` must have the config and `set_timesteps` of the
/// original run; afterwards both hold the states after the step.
pub fn sample_step<D, G>(
    denoiser: &D,
    scheduler: &mut dyn Scheduler,
    guidance: &mut G,
    conds: &Conditions<D::Cond>,
    inputs: &StepInputs,
) -> Result<StepResult>
where
    D: Denoiser + ?Sized,
    G: Guidance + ?Sized,
{
    scheduler.set_state(inputs.scheduler.clone())?;
    guidance.set_state(inputs.guidance.clone());
    run_step(denoiser, scheduler, guidance, conds, inputs)
}

/// One step from the states the scheduler and guidance hold.
fn run_step<D, G>(
    denoiser: &D,
    scheduler: &mut dyn Scheduler,
    guidance: &mut G,
    conds: &Conditions<D::Cond>,
    inputs: &StepInputs,
) -> Result<StepResult>
where
    D: Denoiser + ?Sized,
    G: Guidance + ?Sized,
{
    let n = scheduler.timesteps().len();
    let i = inputs.index;
    let t = *scheduler.timesteps().get(i).ok_or_else(|| {
        Error::invalid("sampling step", format!("step {i} of a {n}-step schedule"))
    })?;
    let x = &inputs.sample;
    let b = x.dim(0)?;
    let x_in = scheduler.scale_model_input(x, t)?;
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
    let s = scheduler.step_with_noise(&out, t, x, inputs.noise.as_ref())?;
    let total = s.prev_sample.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if !total.is_finite() {
        return Err(Error::msg(format!(
            "sampling: the latents turned non-finite (NaN or infinity) at step {} of {n} \
             (timestep {t}); the model's weights or inputs hold non-finite values, or the \
             guidance diverged",
            i + 1
        )));
    }
    Ok(StepResult { sample: s.prev_sample, pred_x0: g.x0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_noise_is_drawn_in_order_and_checked() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &dev)?;
        let b = Tensor::new(&[[4.0f32, 5.0], [-6.0, 7.0]], &dev)?;
        let mut src =
            NoiseSource::Given(VecDeque::from(vec![a, b, Tensor::zeros(3, DType::F32, &dev)?]));
        let first = src.randn(&[2, 2], DType::F32, &dev)?;
        assert_eq!(first.to_vec2::<f32>()?, vec![vec![1.0, -2.0], vec![0.5, 3.0]]);
        let second = src.randn(&[2, 2], DType::F64, &dev)?;
        assert_eq!(second.dtype(), DType::F64);
        assert_eq!(second.to_vec2::<f64>()?, vec![vec![4.0, 5.0], vec![-6.0, 7.0]]);
        let err = src.randn(&[2, 2], DType::F32, &dev).unwrap_err().to_string();
        assert!(err.contains("shape [3]") && err.contains("[2, 2]"), "{err}");
        let err = src.randn(&[2, 2], DType::F32, &dev).unwrap_err().to_string();
        assert!(err.contains("no recorded noise left"), "{err}");
        Ok(())
    }
}
