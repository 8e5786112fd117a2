//! AdamW with PyTorch semantics (`torch.optim.AdamW`, amsgrad off): decoupled weight decay
//! `p -= lr*wd*p` applied before the Adam step, bias correction, `eps` added outside the square
//! root: `p -= lr/(1-β1^t) * m / (sqrt(v)/sqrt(1-β2^t) + eps)`.

use candle_core::Tensor;
use gen_core::{Error, Result};

use crate::optimizer::{GroupConfig, ParamCtx, ParamState, UpdateRule};

/// Hyper-parameters of an AdamW group. Defaults are PyTorch's.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 1e-2 }
    }
}

pub(crate) fn check_lr(lr: f64) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::invalid("lr", format!("{lr} (must be finite and >= 0)")));
    }
    Ok(())
}

pub(crate) fn check_betas(betas: (f64, f64)) -> Result<()> {
    for (name, b) in [("betas.0", betas.0), ("betas.1", betas.1)] {
        if !(0.0..1.0).contains(&b) {
            return Err(Error::invalid(name, format!("{b} (must be in [0, 1))")));
        }
    }
    Ok(())
}

pub(crate) fn check_nonneg(what: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(Error::invalid(what, format!("{v} (must be finite and >= 0)")));
    }
    Ok(())
}

impl GroupConfig for AdamWConfig {
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        check_betas(self.betas)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("weight_decay", self.weight_decay)
    }
}

/// The Adam moment update shared by AdamW, AdamP, GaLore and FRUGAL.
///
/// Updates the slots `{prefix}exp_avg` and `{prefix}exp_avg_sq` of `state` with `grad` at bias
/// correction step `step` and returns `(m, denom, 1/(1-β1^t))` where
/// `denom = sqrt(v)/sqrt(1-β2^t) + eps`.
pub(crate) fn adam_moments(
    state: &mut ParamState,
    prefix: &str,
    grad: &Tensor,
    betas: (f64, f64),
    eps: f64,
    step: u64,
) -> Result<(Tensor, Tensor, f64)> {
    let (b1, b2) = betas;
    let km = format!("{prefix}exp_avg");
    let kv = format!("{prefix}exp_avg_sq");
    let m = state.slot_or_zeros(&km, grad)?;
    let v = state.slot_or_zeros(&kv, grad)?;
    let m = (m.affine(b1, 0.0)? + grad.affine(1.0 - b1, 0.0)?)?;
    let v = (v.affine(b2, 0.0)? + grad.sqr()?.affine(1.0 - b2, 0.0)?)?;
    state.set(&km, m.clone());
    state.set(&kv, v.clone());
    let t = step as i32;
    let bc1 = 1.0 - b1.powi(t);
    let bc2 = 1.0 - b2.powi(t);
    let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), eps)?;
    Ok((m, denom, 1.0 / bc1))
}

/// Where Adam's `eps` and bias correction enter; implementations disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdamForm {
    /// PyTorch `torch.optim.AdamW`: `lr/(1-β1^t) * m / (sqrt(v)/sqrt(1-β2^t) + eps)`, weight
    /// decay `p *= 1 - lr wd` before the step.
    Torch,
    /// Hugging Face transformers' (deprecated) AdamW, which GaLore's reference builds on:
    /// `lr sqrt(1-β2^t)/(1-β1^t) * m / (sqrt(v) + eps)`, weight decay `p -= lr wd p` after
    /// the step.
    Transformers,
}

/// Adam direction for either form: updates the moment slots with `grad` and returns
/// `(m / denom, step factor)`; the update is `lr * factor * direction`.
pub(crate) fn adam_direction(
    state: &mut ParamState,
    grad: &Tensor,
    betas: (f64, f64),
    eps: f64,
    step: u64,
    form: AdamForm,
) -> Result<(Tensor, f64)> {
    match form {
        AdamForm::Torch => {
            let (m, denom, inv_bc1) = adam_moments(state, "", grad, betas, eps, step)?;
            Ok(((m / denom)?, inv_bc1))
        }
        AdamForm::Transformers => {
            let (b1, b2) = betas;
            let m = state.slot_or_zeros("exp_avg", grad)?;
            let v = state.slot_or_zeros("exp_avg_sq", grad)?;
            let m = (m.affine(b1, 0.0)? + grad.affine(1.0 - b1, 0.0)?)?;
            let v = (v.affine(b2, 0.0)? + grad.sqr()?.affine(1.0 - b2, 0.0)?)?;
            state.set("exp_avg", m.clone());
            state.set("exp_avg_sq", v.clone());
            let t = step as i32;
            let factor = (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
            Ok(((m / v.sqrt()?.affine(1.0, eps)?)?, factor))
        }
    }
}

/// The AdamW update rule; use it through [`crate::Optim`].
#[derive(Clone, Copy, Debug, Default)]
pub struct AdamW;

impl UpdateRule for AdamW {
    type Config = AdamWConfig;
    fn name(&self) -> &'static str {
        "adamw"
    }
    fn update(
        &mut self,
        _ctx: ParamCtx<'_>,
        cfg: &AdamWConfig,
        state: &mut ParamState,
        param: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let p = if cfg.weight_decay != 0.0 {
            param.affine(1.0 - cfg.lr * cfg.weight_decay, 0.0)?
        } else {
            param.clone()
        };
        let (m, denom, inv_bc1) = adam_moments(state, "", grad, cfg.betas, cfg.eps, state.step)?;
        let upd = (m / denom)?.affine(cfg.lr * inv_bc1, 0.0)?;
        Ok((p - upd)?)
    }
}
