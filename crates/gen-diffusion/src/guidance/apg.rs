//! Adaptive Projected Guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of
//! High Guidance Scales in Diffusion Models", Algorithm 1). Per step, with `c`, `u` the
//! conditional and unconditional predictions:
//! 1. `delta = c - u`;
//! 2. reverse momentum `m = delta + beta m`, `delta = m` (state per trajectory, reset at its start);
//! 3. `delta *= min(1, r / ||delta||)`, norm per sample over all non-batch dims (r = 0: off);
//! 4. in f64: `c_hat = c / ||c||`, `par = <delta, c_hat> c_hat`, `orth = delta - par`;
//! 5. `update = orth + eta par`, output by [`ApgFormulation`].
//!
//! Formulations (the reference codes disagree):
//! - [`ApgFormulation::Paper`]: `c + (w - 1) update`, in x0 space (default).
//! - [`ApgFormulation::Diffusers`]: `u + w update` on raw model outputs
//!   (`diffusers.guiders.AdaptiveProjectedGuidance`, `use_original_formulation=False`).
//! - [`ApgFormulation::CondPlusW`]: `c + w update` — diffusers with `use_original_formulation=True`
//!   (raw outputs) and ComfyUI's `nodes_apg.py` (x0 space; its `(u + g) + (c - u)/w` fed to CFG is
//!   `c + w g`).
//!
//! With eta = 1, r = 0 and no momentum, Paper equals CFG (`update = delta`).

use candle_core::{DType, Tensor};
use gen_core::{Error, Result};
use serde::{Deserialize, Serialize};

use super::{
    check_scale, cond_only, Branch, Guidance, GuidanceState, Guided, Predictions, Space, StepInfo,
};

/// How the APG update is added (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApgFormulation {
    /// `c + (w - 1) update` (paper).
    Paper,
    /// `u + w update` (diffusers default).
    Diffusers,
    /// `c + w update` (diffusers `use_original_formulation`, ComfyUI).
    CondPlusW,
}

/// APG settings. Presets: [`ApgConfig::paper`] (the default), [`ApgConfig::diffusers`],
/// [`ApgConfig::comfy`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApgConfig {
    /// Guidance scale w (1 = none for Paper/Diffusers; 0 = none for CondPlusW).
    pub scale: f64,
    /// Weight of the parallel component (paper recommends 0).
    pub eta: f64,
    /// Norm threshold r; 0 disables rescaling.
    pub norm_threshold: f64,
    /// Momentum beta (paper: negative, |beta| < 1); 0 disables.
    pub momentum: f64,
    pub formulation: ApgFormulation,
    /// Space the update is computed in.
    pub space: Space,
}

/// Values in one SDXL latent, C·H·W = 4×128×128: the latent size the paper's r = 15 was tuned
/// for (and the presets' r values assume).
pub const SDXL_LATENT_DIM: usize = 4 * 128 * 128;

impl ApgConfig {
    /// A norm threshold `r` tuned on SDXL latents, carried over to latents of `latent_dim` =
    /// C·H·W values: `r·sqrt(latent_dim / SDXL_LATENT_DIM)`. The norm of the guidance update
    /// grows with the square root of the number of values it is taken over, so a threshold
    /// left at r = 15 hardly ever acts on a small latent (4×16×16 gives r / 8).
    pub fn norm_threshold_for_latent(r: f64, latent_dim: usize) -> f64 {
        r * (latent_dim as f64 / SDXL_LATENT_DIM as f64).sqrt()
    }

    /// Paper defaults (SDXL row of Table 10 via diffusers PR #9626): eta 0, r 15, beta -0.5, x0 space.
    pub fn paper(scale: f64) -> Self {
        Self {
            scale,
            eta: 0.0,
            norm_threshold: 15.0,
            momentum: -0.5,
            formulation: ApgFormulation::Paper,
            space: Space::X0,
        }
    }
    /// diffusers `AdaptiveProjectedGuidance` defaults: eta 1, r 15, no momentum, raw outputs, `u + w update`.
    pub fn diffusers(scale: f64) -> Self {
        Self {
            scale,
            eta: 1.0,
            norm_threshold: 15.0,
            momentum: 0.0,
            formulation: ApgFormulation::Diffusers,
            space: Space::ModelOutput,
        }
    }
    /// ComfyUI `APG` node defaults: eta 1, norm_threshold 5, momentum 0, x0 space, `c + w update`.
    pub fn comfy(scale: f64) -> Self {
        Self {
            scale,
            eta: 1.0,
            norm_threshold: 5.0,
            momentum: 0.0,
            formulation: ApgFormulation::CondPlusW,
            space: Space::X0,
        }
    }

    fn validate(&self) -> Result<()> {
        check_scale("APG scale", self.scale)?;
        if !self.eta.is_finite() {
            return Err(Error::invalid("APG eta", format!("{} is not finite", self.eta)));
        }
        if !(self.norm_threshold >= 0.0 && self.norm_threshold.is_finite()) {
            return Err(Error::invalid(
                "APG norm_threshold",
                format!("{} (must be >= 0; 0 disables)", self.norm_threshold),
            ));
        }
        if self.momentum.is_nan() || self.momentum.abs() >= 1.0 {
            return Err(Error::invalid(
                "APG momentum",
                format!("{} (need |beta| < 1)", self.momentum),
            ));
        }
        Ok(())
    }
}

/// APG guidance. Its momentum between steps is the [`GuidanceState`] read and restored by
/// [`Guidance::state`] / [`Guidance::set_state`].
#[derive(Debug, Clone)]
pub struct Apg {
    pub config: ApgConfig,
    running: Option<Tensor>,
    last_sigma: Option<f64>,
}

impl Apg {
    pub fn new(config: ApgConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, running: None, last_sigma: None })
    }

    fn active(&self) -> bool {
        match self.config.formulation {
            ApgFormulation::Paper | ApgFormulation::Diffusers => self.config.scale != 1.0,
            ApgFormulation::CondPlusW => self.config.scale != 0.0,
        }
    }

    /// The APG output from `c` and `u` in one space (steps 1–5), updating the momentum state.
    /// Shapes (B, ...).
    pub fn guide(&mut self, c: &Tensor, u: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let b = c.dim(0)?;
        let mut delta = (c - u)?;
        if cfg.momentum != 0.0 {
            let m = match &self.running {
                Some(m) if m.dims() == delta.dims() => (&delta + (m * cfg.momentum)?)?,
                _ => delta.clone(),
            };
            self.running = Some(m.clone());
            delta = m;
        }
        if cfg.norm_threshold > 0.0 {
            // delta * min(1, r / ||delta||), per sample; tensor ops so gradients flow through the norm.
            let flat = delta.reshape((b, ()))?;
            let norm = flat.sqr()?.sum_keepdim(1)?.sqrt()?;
            let factor = (norm.recip()? * cfg.norm_threshold)?.clamp(0.0, 1.0)?;
            delta = flat.broadcast_mul(&factor)?.reshape(c.shape())?;
        }
        // Projection onto c in f64.
        let v0 = delta.to_dtype(DType::F64)?.reshape((b, ()))?;
        let v1 = c.to_dtype(DType::F64)?.reshape((b, ()))?;
        let n1 = v1.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
        let c_hat = v1.broadcast_div(&n1)?;
        let par = c_hat.broadcast_mul(&(&v0 * &c_hat)?.sum_keepdim(1)?)?;
        let orth = (&v0 - &par)?;
        let (par, orth) = (
            par.to_dtype(c.dtype())?.reshape(c.shape())?,
            orth.to_dtype(c.dtype())?.reshape(c.shape())?,
        );
        let update = (orth + (par * cfg.eta)?)?;
        Ok(match cfg.formulation {
            ApgFormulation::Paper => (c + (update * (cfg.scale - 1.0))?)?,
            ApgFormulation::Diffusers => (u + (update * cfg.scale)?)?,
            ApgFormulation::CondPlusW => (c + (update * cfg.scale)?)?,
        })
    }
}

impl Guidance for Apg {
    fn name(&self) -> String {
        let c = &self.config;
        format!(
            "apg(w={}, eta={}, r={}, beta={}, {:?}, {:?})",
            c.scale, c.eta, c.norm_threshold, c.momentum, c.formulation, c.space
        )
    }
    fn branches(&self, _: &StepInfo) -> Vec<Branch> {
        if self.active() {
            vec![Branch::Cond, Branch::Uncond]
        } else {
            vec![Branch::Cond]
        }
    }
    fn combine(&mut self, preds: &Predictions, step: &StepInfo) -> Result<Guided> {
        // A new trajectory starts at step 0 or when the noise level goes back up.
        let restart =
            matches!(step.step, Some((0, _))) || self.last_sigma.is_some_and(|s| step.sigma > s);
        if restart {
            self.reset();
        }
        self.last_sigma = Some(step.sigma);
        if preds.uncond.is_none() || !self.active() {
            return Ok(cond_only(preds));
        }
        let space = self.config.space;
        let c = preds.get(Branch::Cond, space)?;
        let u = preds.get(Branch::Uncond, space)?;
        Ok(Guided { value: self.guide(&c, &u)?, space })
    }
    fn state(&self) -> GuidanceState {
        GuidanceState { momentum: self.running.clone(), last_sigma: self.last_sigma }
    }
    fn set_state(&mut self, state: GuidanceState) {
        self.running = state.momentum;
        self.last_sigma = state.last_sigma;
    }
}
