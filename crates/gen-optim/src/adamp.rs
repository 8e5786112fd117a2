//! AdamP and SGDP (Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
//! Scale-invariant Weights", ICLR 2021), with the semantics of clovaai/AdamP.
//!
//! For a parameter with more than one dimension, the rule tests whether it looks
//! scale-invariant: the absolute cosine between gradient and weight, first per output channel
//! (view `(C, -1)`), then over the whole tensor (view `(1, -1)`), must stay below
//! `delta / sqrt(row length)` for every row. The first view that passes removes the radial part
//! of the update, `u -= ŵ <ŵ, u>` with `ŵ = w / (|w| + eps)` per row, and multiplies the weight
//! decay by `wd_ratio`. Weight decay is decoupled (`p *= 1 - lr*wd*ratio`, divided by
//! `1 - momentum` in SGDP) and applied before the step.
//!
//! One detail of the reference kept here: SGDP without Nesterov projects its update in place,
//! and that update is the momentum buffer, so the buffer itself is stored projected.

use candle_core::{DType, Tensor};
use gen_core::{Error, Result};

use crate::adamw::{adam_moments, check_betas, check_lr, check_nonneg};
use crate::optimizer::{GroupConfig, ParamCtx, ParamState, UpdateRule};

/// Hyper-parameters of an AdamP group. Defaults are clovaai/AdamP's.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamPConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Threshold of the scale-invariance test (`delta / sqrt(dim)`).
    pub delta: f64,
    /// Weight-decay multiplier for scale-invariant weights.
    pub wd_ratio: f64,
    pub nesterov: bool,
}

impl Default for AdamPConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            delta: 0.1,
            wd_ratio: 0.1,
            nesterov: false,
        }
    }
}

impl GroupConfig for AdamPConfig {
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
        check_nonneg("weight_decay", self.weight_decay)?;
        check_nonneg("delta", self.delta)?;
        check_nonneg("wd_ratio", self.wd_ratio)
    }
}

/// Hyper-parameters of an SGDP group. Defaults are clovaai/AdamP's except `lr` (required there).
#[derive(Clone, Debug, PartialEq)]
pub struct SgdpConfig {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub eps: f64,
    pub delta: f64,
    pub wd_ratio: f64,
}

impl Default for SgdpConfig {
    fn default() -> Self {
        Self {
            lr: 1e-2,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            eps: 1e-8,
            delta: 0.1,
            wd_ratio: 0.1,
        }
    }
}

impl GroupConfig for SgdpConfig {
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::invalid(
                "momentum",
                format!(
                    "{} (must be in [0, 1): weight decay divides by 1 - momentum)",
                    self.momentum
                ),
            ));
        }
        check_nonneg("dampening", self.dampening)?;
        check_nonneg("weight_decay", self.weight_decay)?;
        check_nonneg("eps", self.eps)?;
        check_nonneg("delta", self.delta)?;
        check_nonneg("wd_ratio", self.wd_ratio)
    }
}

/// Which view passed the scale-invariance test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Projected {
    /// Per output channel, view `(C, -1)`.
    Channel,
    /// Whole tensor, view `(1, -1)`.
    Layer,
}

/// Largest |cos(x_i, y_i)| over the rows of the `(rows, cols)` views (PyTorch
/// `cosine_similarity`: each norm clamped below at `eps`).
fn max_abs_cosine(x: &Tensor, y: &Tensor, eps: f64) -> Result<f64> {
    let nx = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(eps, f64::INFINITY)?;
    let ny = y.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(eps, f64::INFINITY)?;
    let cos = (x.broadcast_div(&nx)? * y.broadcast_div(&ny)?)?.sum_keepdim(1)?;
    let max = cos.abs()?.max_all()?;
    // Read back without an f64 cast on the device (Metal has no f64).
    Ok(match max.dtype() {
        DType::F64 => max.to_scalar::<f64>()?,
        _ => max.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64,
    })
}

/// The AdamP/SGDP projection. `param`, `grad`, `update` have the same shape (at least 2-D).
/// Returns the (possibly projected) update and which view triggered, if any.
pub fn scale_invariant_projection(
    param: &Tensor,
    grad: &Tensor,
    update: &Tensor,
    delta: f64,
    eps: f64,
) -> Result<(Tensor, Option<Projected>)> {
    let shape = param.shape().clone();
    let n = shape.elem_count();
    let c = shape.dims().first().copied().unwrap_or(1).max(1);
    for (rows, which) in [(c, Projected::Channel), (1, Projected::Layer)] {
        let cols = n / rows;
        let w = param.reshape((rows, cols))?;
        let g = grad.reshape((rows, cols))?;
        if max_abs_cosine(&g, &w, eps)? < delta / (cols as f64).sqrt() {
            let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?.affine(1.0, eps)?;
            let w_hat = w.broadcast_div(&norm)?;
            let u = update.reshape((rows, cols))?;
            let radial = (&w_hat * &u)?.sum_keepdim(1)?;
            let u = (u - w_hat.broadcast_mul(&radial)?)?;
            return Ok((u.reshape(shape)?, Some(which)));
        }
    }
    Ok((update.clone(), None))
}

/// The AdamP update rule; use it through [`crate::Optim`].
#[derive(Clone, Copy, Debug, Default)]
pub struct AdamP;

impl UpdateRule for AdamP {
    type Config = AdamPConfig;
    fn name(&self) -> &'static str {
        "adamp"
    }
    fn update(
        &mut self,
        _ctx: ParamCtx<'_>,
        cfg: &AdamPConfig,
        state: &mut ParamState,
        param: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let (m, denom, inv_bc1) = adam_moments(state, "", grad, cfg.betas, cfg.eps, state.step)?;
        let perturb = if cfg.nesterov {
            let b1 = cfg.betas.0;
            (m.affine(b1, 0.0)? + grad.affine(1.0 - b1, 0.0)?)?.div(&denom)?
        } else {
            m.div(&denom)?
        };
        let mut wd_ratio = 1.0;
        let mut perturb = perturb;
        if param.rank() > 1 {
            let (u, which) = scale_invariant_projection(param, grad, &perturb, cfg.delta, cfg.eps)?;
            perturb = u;
            if which.is_some() {
                wd_ratio = cfg.wd_ratio;
            }
        }
        let p = if cfg.weight_decay > 0.0 {
            param.affine(1.0 - cfg.lr * cfg.weight_decay * wd_ratio, 0.0)?
        } else {
            param.clone()
        };
        Ok((p - perturb.affine(cfg.lr * inv_bc1, 0.0)?)?)
    }
}

/// The SGDP update rule; use it through [`crate::Optim`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Sgdp;

impl UpdateRule for Sgdp {
    type Config = SgdpConfig;
    fn name(&self) -> &'static str {
        "sgdp"
    }
    fn update(
        &mut self,
        _ctx: ParamCtx<'_>,
        cfg: &SgdpConfig,
        state: &mut ParamState,
        param: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let buf = state.slot_or_zeros("momentum", grad)?;
        let buf = (buf.affine(cfg.momentum, 0.0)? + grad.affine(1.0 - cfg.dampening, 0.0)?)?;
        state.set("momentum", buf.clone());
        let mut d_p = if cfg.nesterov { (grad + buf.affine(cfg.momentum, 0.0)?)? } else { buf };
        let mut wd_ratio = 1.0;
        if param.rank() > 1 {
            let (u, which) = scale_invariant_projection(param, grad, &d_p, cfg.delta, cfg.eps)?;
            if which.is_some() {
                wd_ratio = cfg.wd_ratio;
                if !cfg.nesterov {
                    // clovaai/AdamP projects `d_p` in place, and without Nesterov `d_p` is the
                    // momentum buffer itself: the stored buffer is the projected one.
                    state.set("momentum", u.clone());
                }
            }
            d_p = u;
        }
        let p = if cfg.weight_decay > 0.0 {
            param.affine(1.0 - cfg.lr * cfg.weight_decay * wd_ratio / (1.0 - cfg.momentum), 0.0)?
        } else {
            param.clone()
        };
        Ok((p - d_p.affine(cfg.lr, 0.0)?)?)
    }
}
