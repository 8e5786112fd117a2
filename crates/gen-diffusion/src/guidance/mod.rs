//! Guidance: how the predictions of several condition branches are combined into one.
//!
//! One implementation serves sampling, score distillation and reward fine-tuning. A method is
//! a [`Guidance`] component (one file each, the diffusers `guiders/` habit): it says which
//! [`Branch`]es it needs at a step and combines their predictions, in model-output space or in
//! x0 space ([`Space`]); [`Predictions`] converts between the two. Wrappers ([`Rescale`],
//! [`Interval`]) compose with any guidance.
//!
//! Convention: guidance scale `w` as in diffusers and the CFG paper, `D = u + w (c - u)`;
//! `w = 1` means no guidance (the conditional prediction). threestudio writes `c + s (c - u)`,
//! i.e. `s = w - 1` (its SDS default s = 100 is w = 101 here).

mod apg;
mod cfg;
mod config;
mod interval;
mod rescale;

pub use apg::{Apg, ApgConfig, ApgFormulation, SDXL_LATENT_DIM};
pub use cfg::Cfg;
pub use config::{GuidanceConfig, GuidanceMethod};
pub use interval::{Interval, IntervalRange};
pub use rescale::{rescale_to_reference, Rescale};

use candle_core::Tensor;
use gen_core::{Error, Result};

use crate::prediction::{convert, PredictionType};

/// A model evaluation branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Branch {
    /// With the condition (prompt).
    Cond,
    /// Without it (empty / negative prompt).
    Uncond,
}

/// The space a guidance combines predictions in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Space {
    /// The model's own output (eps, v or x0, whatever it predicts).
    ModelOutput,
    /// The denoised estimate x0 = D(x).
    X0,
}

/// Where in a trajectory the guidance is applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Step index and number of steps (sampling); `None` outside a sampling loop (e.g. SDS).
    pub step: Option<(usize, usize)>,
    /// Model timestep.
    pub timestep: f64,
    /// Noise level `sqrt((1-a)/a)` of the model input.
    pub sigma: f64,
}

/// Raw branch predictions at one model input, with what is needed to change space.
#[derive(Debug, Clone)]
pub struct Predictions {
    /// Conditional prediction, (B, ...).
    pub cond: Tensor,
    /// Unconditional prediction, (B, ...), when that branch was evaluated.
    pub uncond: Option<Tensor>,
    /// The model input x_t the predictions were made at, (B, ...).
    pub x_t: Tensor,
    /// Cumulative alpha of the model input, per sample.
    pub alpha_cumprod: Vec<f64>,
    /// What the model predicts.
    pub prediction_type: PredictionType,
}

impl Predictions {
    /// The prediction of `branch` in `space`.
    pub fn get(&self, branch: Branch, space: Space) -> Result<Tensor> {
        let raw = match branch {
            Branch::Cond => &self.cond,
            Branch::Uncond => self
                .uncond
                .as_ref()
                .ok_or_else(|| Error::msg("guidance: the unconditional branch was not evaluated (the guidance did not ask for it)"))?,
        };
        self.to_space(raw, Space::ModelOutput, space)
    }

    /// Converts `t` from space `from` to space `to`.
    pub fn to_space(&self, t: &Tensor, from: Space, to: Space) -> Result<Tensor> {
        let kind = |s: Space| match s {
            Space::ModelOutput => self.prediction_type,
            Space::X0 => PredictionType::Sample,
        };
        convert(t, &self.x_t, &self.alpha_cumprod, kind(from), kind(to))
    }
}

/// A guidance result and the space it is in.
#[derive(Debug, Clone)]
pub struct Guided {
    pub value: Tensor,
    pub space: Space,
}

/// What a guidance carries from one step of a trajectory to the next (APG's running average
/// of the guidance direction and the noise level it last saw). [`Guidance::state`] reads it
/// and [`Guidance::set_state`] restores it, so a step can be recomputed from (step index,
/// sample, state) alone, as diffusers' guiders receive their step state from outside.
#[derive(Debug, Clone, Default)]
pub struct GuidanceState {
    /// APG's momentum buffer `m`, (B, ...); `None` before the first guided step.
    pub momentum: Option<Tensor>,
    /// The noise level of the last combined step (a higher one starts a new trajectory).
    pub last_sigma: Option<f64>,
}

/// A guidance method. `branches` is asked first at every step; `combine` then receives those
/// branches' predictions. Per-trajectory state is a [`GuidanceState`] value.
pub trait Guidance: Send {
    /// Short name for logs and run configs.
    fn name(&self) -> String;
    /// Branches to evaluate at this step. Always contains [`Branch::Cond`].
    fn branches(&self, step: &StepInfo) -> Vec<Branch>;
    /// Combines the predictions (shapes (B, ...)).
    fn combine(&mut self, preds: &Predictions, step: &StepInfo) -> Result<Guided>;
    /// The state after the steps combined so far (stateless methods: the default).
    fn state(&self) -> GuidanceState {
        GuidanceState::default()
    }
    /// Restores a state read by [`Guidance::state`]; the next `combine` then computes exactly
    /// what it computed from there.
    fn set_state(&mut self, state: GuidanceState) {
        let _ = state;
    }
    /// Forgets per-trajectory state (momentum). Called at the start of every trajectory.
    fn reset(&mut self) {
        self.set_state(GuidanceState::default())
    }
}

impl<G: Guidance + ?Sized> Guidance for Box<G> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn branches(&self, step: &StepInfo) -> Vec<Branch> {
        (**self).branches(step)
    }
    fn combine(&mut self, preds: &Predictions, step: &StepInfo) -> Result<Guided> {
        (**self).combine(preds, step)
    }
    fn state(&self) -> GuidanceState {
        (**self).state()
    }
    fn set_state(&mut self, state: GuidanceState) {
        (**self).set_state(state)
    }
    fn reset(&mut self) {
        (**self).reset()
    }
}

/// No guidance: the conditional prediction.
#[derive(Debug, Clone, Default)]
pub struct NoGuidance;

impl Guidance for NoGuidance {
    fn name(&self) -> String {
        "none".into()
    }
    fn branches(&self, _: &StepInfo) -> Vec<Branch> {
        vec![Branch::Cond]
    }
    fn combine(&mut self, preds: &Predictions, _: &StepInfo) -> Result<Guided> {
        Ok(Guided { value: preds.cond.clone(), space: Space::ModelOutput })
    }
}

/// The conditional prediction unchanged (used when a guidance is off at a step).
pub(crate) fn cond_only(preds: &Predictions) -> Guided {
    Guided { value: preds.cond.clone(), space: Space::ModelOutput }
}

fn check_scale(what: &str, w: f64) -> Result<()> {
    if !w.is_finite() {
        return Err(Error::invalid(what, format!("{w} is not finite")));
    }
    Ok(())
}
