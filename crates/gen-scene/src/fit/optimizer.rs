//! The loss-agnostic splat optimiser: [`SplatOptimizer`] renders a camera, hands the render to
//! any objective (a photometric loss against a photo, a surrogate of a score-distillation
//! gradient — see [`image_gradient_loss`]), back-propagates, steps AdamW (one group per field,
//! the means' rate on a log-linear schedule) and lets a [`DensityStrategy`] grow and prune
//! the Gaussians.

use candle_core::{DType, Device, Tensor};
use gen_core::{Error, Result};
use gen_optim::{AdamW, AdamWConfig, Optim, Optimizer};

use super::config::LearningRates;
use crate::camera::Camera;
use crate::density::{
    splat_param_groups, DensityStrategy, RenderInfo, SplatParams, StrategyReport, PARAM_NAMES,
};
use crate::splat::{render, render_with_probe, RenderConfig, RenderOutput, SplatVars, Splats};

/// The AdamW configs of the five splat groups (order of [`crate::density::PARAM_NAMES`]).
pub(crate) fn adam_configs(lr: &LearningRates, means_lr: f64) -> [AdamWConfig; 5] {
    let c = |lr: f64| AdamWConfig { lr, betas: (0.9, 0.999), eps: 1e-15, weight_decay: 0.0 };
    [c(means_lr), c(lr.scales), c(lr.rotation), c(lr.opacity), c(lr.colour)]
}

/// A scalar loss whose gradient with respect to `image` is `grad` (same shape): the sum of
/// `image ⊙ grad` with `grad` detached. Turns a gradient on the rendered image (score
/// distillation's `w(t) (ε̂ − ε)` pulled back to pixels) into an objective for
/// [`SplatOptimizer::step`] or the field optimiser.
pub fn image_gradient_loss(image: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if image.dims() != grad.dims() {
        return Err(Error::invalid(
            "image gradient",
            format!("shape {:?} for an image of shape {:?}", grad.dims(), image.dims()),
        ));
    }
    Ok((image * grad.detach().to_dtype(image.dtype())?)?.sum_all()?)
}

/// The error for a non-finite loss at (1-based) step `step`.
pub(crate) fn check_loss(step: u64, loss: f64) -> Result<()> {
    if loss.is_finite() {
        return Ok(());
    }
    Err(Error::msg(format!(
        "step {step}: the loss is {loss}; fitting stopped (lower the learning rates, or check the \
         inputs for NaN/inf)"
    )))
}

/// The error when `t` (parameter `what`) holds a NaN or an infinity after step `step`.
pub(crate) fn check_finite(step: u64, what: &str, t: &Tensor) -> Result<()> {
    let s = t.abs()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if s.is_finite() {
        return Ok(());
    }
    Err(Error::msg(format!(
        "step {step}: {what} turned non-finite ({s}); fitting stopped (lower the learning rates)"
    )))
}

/// What one [`SplatOptimizer::step`] did.
#[derive(Debug, Clone)]
pub struct OptimStep<T> {
    /// Steps completed (1 after the first).
    pub step: u64,
    /// The objective's value.
    pub loss: f64,
    /// Gaussians after the step (and after density control).
    pub gaussians: usize,
    pub strategy: StrategyReport,
    /// What the objective returned besides the loss.
    pub aux: T,
}

/// Splats under optimisation (see the module docs).
pub struct SplatOptimizer<S: DensityStrategy> {
    params: SplatParams,
    strategy: S,
    lr: LearningRates,
    /// Length of the learning-rate schedule.
    steps: u64,
    step: u64,
    render: RenderConfig,
}

impl<S: DensityStrategy> SplatOptimizer<S> {
    /// An optimiser at step 0 over copies of `splats` (converted to f32 on `device`); the
    /// means' rate decays over `steps` steps.
    pub fn new(
        splats: &Splats,
        lr: LearningRates,
        steps: u64,
        render: RenderConfig,
        strategy: S,
        device: &Device,
    ) -> Result<Self> {
        let f = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(device)?) };
        let splats = Splats {
            means: f(&splats.means)?,
            log_scales: f(&splats.log_scales)?,
            quats: f(&splats.quats)?,
            opacity_logits: f(&splats.opacity_logits)?,
            sh: f(&splats.sh)?,
        };
        if splats.is_empty() {
            return Err(Error::invalid("splat optimiser", "no Gaussians to optimise"));
        }
        let vars = SplatVars::new(&splats)?;
        let opt =
            Optim::new(AdamW, splat_param_groups(&vars, adam_configs(&lr, lr.means_at(0, steps))))?;
        Ok(Self { params: SplatParams { vars, opt }, strategy, lr, steps, step: 0, render })
    }

    /// Steps completed.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The current splats (detached copies).
    pub fn splats(&self) -> Splats {
        self.params.vars.splats().detach()
    }

    pub fn render_config(&self) -> RenderConfig {
        self.render
    }

    pub fn strategy(&self) -> &S {
        &self.strategy
    }

    pub fn strategy_mut(&mut self) -> &mut S {
        &mut self.strategy
    }

    pub fn optimizer(&self) -> &Optim<AdamW> {
        &self.params.opt
    }

    pub fn optimizer_mut(&mut self) -> &mut Optim<AdamW> {
        &mut self.params.opt
    }

    /// Renders `camera` with the current splats (no probe).
    pub fn render(&self, camera: &Camera) -> Result<RenderOutput> {
        render(&self.splats(), camera, &self.render)
    }

    /// Continues at step `step` (after restoring the optimizer state from a checkpoint).
    pub(crate) fn set_step(&mut self, step: u64) -> Result<()> {
        self.step = step;
        self.params.opt.set_group_lr(0, self.lr.means_at(step, self.steps))?;
        Ok(())
    }

    /// One step: renders `camera` (differentiably), takes `objective(render) = (loss, aux)`
    /// with a scalar `loss`, back-propagates, steps the optimizer and runs the strategy.
    pub fn step<T>(
        &mut self,
        camera: &Camera,
        objective: impl FnOnce(&RenderOutput) -> Result<(Tensor, T)>,
    ) -> Result<OptimStep<T>> {
        let splats = self.params.vars.splats();
        let n = splats.len();
        let dev = splats.means.device().clone();
        let probe = self.strategy.step_pre_backward(n, DType::F32, &dev)?;
        let out = match &probe {
            Some(p) => render_with_probe(&splats, camera, &self.render, p)?,
            None => render(&splats, camera, &self.render)?,
        };
        let (loss, aux) = objective(&out)?;
        if loss.elem_count() != 1 {
            return Err(Error::invalid(
                "splat objective",
                format!("loss of shape {:?}", loss.dims()),
            ));
        }
        let loss_value = loss.to_dtype(DType::F32)?.reshape(())?.to_scalar::<f32>()? as f64;
        check_loss(self.step + 1, loss_value)?;
        let grads = loss.backward()?;
        let radii = out.radii()?;
        self.params.opt.set_group_lr(0, self.lr.means_at(self.step, self.steps))?;
        self.params.opt.step(&grads)?;
        self.step += 1;
        for (name, v) in PARAM_NAMES.iter().zip(self.params.vars.all()) {
            check_finite(self.step, &format!("splat `{name}`"), v.as_tensor())?;
        }
        let k = camera.intrinsics;
        let info = RenderInfo {
            step: self.step,
            grads: &grads,
            probe: probe.as_ref(),
            radii: &radii,
            width: k.width,
            height: k.height,
        };
        let strategy = self.strategy.step_post_backward(&mut self.params, &info)?;
        Ok(OptimStep {
            step: self.step,
            loss: loss_value,
            gaussians: self.params.len(),
            strategy,
            aux,
        })
    }
}
