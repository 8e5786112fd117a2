//! The model-agnostic denoiser interface and one guided model evaluation.

use candle_core::Tensor;
use gen_core::{Error, Result};

use crate::guidance::{Branch, Guidance, Predictions, Space, StepInfo};
use crate::prediction::PredictionType;

/// A denoising model: given the model input `x_t`, per-sample timesteps and one condition per
/// branch, it returns the model's prediction for each branch. Implementations may batch the
/// branches into one forward pass. `Cond` is whatever conditions the model (text embeddings…).
pub trait Denoiser {
    type Cond;
    /// What the model predicts.
    fn prediction_type(&self) -> PredictionType;
    /// `x`: (B, C, H, W) model input (already `scale_model_input`-ed); `timesteps`: B values;
    /// `conds`: one condition per branch. Returns one (B, C, H, W) prediction per entry of `conds`.
    fn predict(&self, x: &Tensor, timesteps: &[f64], conds: &[&Self::Cond]) -> Result<Vec<Tensor>>;
}

/// The conditions of the guidance branches.
#[derive(Debug, Clone)]
pub struct Conditions<C> {
    pub cond: C,
    /// Needed by any guidance that uses the unconditional branch.
    pub uncond: Option<C>,
}

/// Result of [`guided_prediction`].
#[derive(Debug, Clone)]
pub struct GuidedPrediction {
    /// Guided prediction in the denoiser's prediction type, (B, ...).
    pub model_output: Tensor,
    /// Guided clean-sample estimate, (B, ...).
    pub x0: Tensor,
    /// The raw branch predictions.
    pub preds: Predictions,
}

/// Evaluates the branches `guidance` asks for and combines them.
/// `x_in`: model input (B, ...); `timesteps`, `alpha_cumprod`: per sample (the alpha relating
/// `x_in` to x0, see [`crate::Scheduler::model_alpha_cumprod`]).
pub fn guided_prediction<D, G>(
    denoiser: &D,
    guidance: &mut G,
    x_in: &Tensor,
    timesteps: &[f64],
    alpha_cumprod: &[f64],
    conds: &Conditions<D::Cond>,
    step: &StepInfo,
) -> Result<GuidedPrediction>
where
    D: Denoiser + ?Sized,
    G: Guidance + ?Sized,
{
    let b = x_in.dim(0)?;
    if timesteps.len() != b || alpha_cumprod.len() != b {
        return Err(Error::invalid(
            "guided_prediction",
            format!(
                "batch {b} but {} timesteps and {} alphas",
                timesteps.len(),
                alpha_cumprod.len()
            ),
        ));
    }
    let branches = guidance.branches(step);
    let mut cond_refs = Vec::with_capacity(branches.len());
    for br in &branches {
        cond_refs.push(match br {
            Branch::Cond => &conds.cond,
            Branch::Uncond => conds.uncond.as_ref().ok_or_else(|| {
                Error::invalid("conditions", format!("guidance `{}` needs the unconditional branch, but no unconditional condition was given", guidance.name()))
            })?,
        });
    }
    let outs = denoiser.predict(x_in, timesteps, &cond_refs)?;
    if outs.len() != branches.len() {
        return Err(Error::msg(format!(
            "denoiser returned {} predictions for {} branches",
            outs.len(),
            branches.len()
        )));
    }
    let mut cond = None;
    let mut uncond = None;
    for (br, out) in branches.iter().zip(outs) {
        if out.dims() != x_in.dims() {
            return Err(Error::invalid(
                "denoiser output",
                format!("shape {:?} for input {:?} (branch {br:?})", out.dims(), x_in.dims()),
            ));
        }
        match br {
            Branch::Cond => cond = Some(out),
            Branch::Uncond => uncond = Some(out),
        }
    }
    let cond = cond.ok_or_else(|| {
        Error::msg(format!("guidance `{}` did not ask for the conditional branch", guidance.name()))
    })?;
    let preds = Predictions {
        cond,
        uncond,
        x_t: x_in.clone(),
        alpha_cumprod: alpha_cumprod.to_vec(),
        prediction_type: denoiser.prediction_type(),
    };
    let g = guidance.combine(&preds, step)?;
    let model_output = preds.to_space(&g.value, g.space, Space::ModelOutput)?;
    let x0 = preds.to_space(&g.value, g.space, Space::X0)?;
    Ok(GuidedPrediction { model_output, x0, preds })
}
