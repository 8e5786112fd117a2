//! CFG-rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
//! Flawed", Sec. 3.4): `x_r = x * std(c) / std(x)` (std per sample over all non-batch dims),
//! `out = phi x_r + (1 - phi) x`. A wrapper over any guidance (diffusers applies it after
//! CFG and APG alike), in model-output space by default as diffusers does.

use candle_core::{DType, Tensor};
use gen_core::{Error, Result};

use super::{Branch, Guidance, GuidanceState, Guided, Predictions, Space, StepInfo};

/// `phi * x * std(reference)/std(x) + (1 - phi) * x`, std per sample over all non-batch dims
/// (computed in f64; differentiable). Shapes (B, ...). As in diffusers, a constant `x` (std 0)
/// gives non-finite values.
pub fn rescale_to_reference(x: &Tensor, reference: &Tensor, phi: f64) -> Result<Tensor> {
    let b = x.dim(0)?;
    let std = |t: &Tensor| -> Result<Tensor> {
        let f = t.to_dtype(DType::F64)?.reshape((b, ()))?;
        let mean = f.mean_keepdim(1)?;
        Ok(f.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?.sqrt()?)
    };
    let ratio = (std(reference)? / std(x)?)?;
    let factor = ((ratio * phi)? + (1.0 - phi))?.to_dtype(x.dtype())?;
    Ok(x.reshape((b, ()))?.broadcast_mul(&factor)?.reshape(x.shape())?)
}

/// Rescale wrapper: guides with `inner`, then rescales towards the conditional prediction's std.
pub struct Rescale<G: Guidance> {
    pub inner: G,
    /// phi in [0, 1]; the paper uses 0.7.
    pub phi: f64,
    pub space: Space,
}

impl<G: Guidance> Rescale<G> {
    pub fn new(inner: G, phi: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&phi) {
            return Err(Error::invalid("CFG-rescale phi", format!("{phi} is outside [0, 1]")));
        }
        Ok(Self { inner, phi, space: Space::ModelOutput })
    }
}

impl Rescale<super::Cfg> {
    /// CFG followed by rescale: `cfg_rescale(w, 0.7)`.
    pub fn cfg(scale: f64, phi: f64) -> Result<Self> {
        Self::new(super::Cfg::new(scale)?, phi)
    }
}

impl<G: Guidance> Guidance for Rescale<G> {
    fn name(&self) -> String {
        format!("rescale(phi={}, {})", self.phi, self.inner.name())
    }
    fn branches(&self, step: &StepInfo) -> Vec<Branch> {
        self.inner.branches(step)
    }
    fn combine(&mut self, preds: &Predictions, step: &StepInfo) -> Result<Guided> {
        let g = self.inner.combine(preds, step)?;
        if self.phi == 0.0 || preds.uncond.is_none() {
            return Ok(g);
        }
        let x = preds.to_space(&g.value, g.space, self.space)?;
        let c = preds.get(Branch::Cond, self.space)?;
        Ok(Guided { value: rescale_to_reference(&x, &c, self.phi)?, space: self.space })
    }
    fn state(&self) -> GuidanceState {
        self.inner.state()
    }
    fn set_state(&mut self, state: GuidanceState) {
        self.inner.set_state(state)
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
}
